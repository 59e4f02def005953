"""Every causal-LM model type of the installed transformers, tried: which decoders bake reads (by a
family table or by the probe) and whether random specs fold into them exactly. Writes
benchmarks/results/families_sweep.json and docs/families-sweep.md.

Per model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: build a tiny random config (2 layers, hidden 32,
few heads; the config class's own defaults otherwise) and its ForCausalLM class; run one forward pass;
types whose base model is a masked LM (BERT-likes) or a seq2seq model (BART, Whisper, ...) are out of
scope and not counted. Then the family (table or probe) and, for each site group (post-norms;
attn-out + mlp-out + mlp-in; residual; every site), a random spec of affine / additive / projection
maps (test_differential.random_spec) is folded by the passes into a copy and compared with the hooked
reference on random ids: exact (relative logit error <= 1e-5), refused (the reason bake gives), or, for
what is refused, kept as inserted modules (`--insert-modules`) and compared the same way.

    python benchmarks/families_sweep.py [--types llama,granite]
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from tqdm.auto import tqdm
from transformers.models.auto import modeling_auto as auto

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bake import passes  # noqa: E402
from bake.errors import BakeError  # noqa: E402
from bake.families import adapter_for  # noqa: E402
from bake.plan import bind  # noqa: E402
from bake.runtime import steered  # noqa: E402
from test_differential import random_spec  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2, n_routed_experts=4)
GROUPS = {"post-norms": ["post-norms"], "writers": ["attn-out", "mlp-out", "mlp-in"], "residual": ["residual"],
          "all": ["**"]}
OUT_OF_SCOPE = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


SKIP = {"moshi": "its tiny config grew past 12 GB of memory in the forward pass (not investigated)"}
MAX_PARAMS = 20_000_000  # a config class that ignores the tiny widths builds its full size: skipped


def build(mt: str):
    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model(mt, **SMALL)
    cls = getattr(tf, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt])
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"the tiny config is not honoured: {n / 1e6:.0f} M parameters")
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    return model


def rel_error(model, spec, insert: bool) -> float:
    baked = copy.deepcopy(model)
    plan = bind([spec], baked, check_model=False)
    plan.insert_modules = insert
    passes.run(plan)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with steered(model, [spec], check_model=False):
            ref = model(ids).logits
        got = plan.model(ids).logits
    return float((got - ref).abs().max() / ref.abs().max())


def group(model, patterns: list[str], seed: int) -> dict:
    try:
        spec = random_spec(model, patterns, seed)
    except BakeError:
        return {"outcome": "no such site"}
    try:
        return {"outcome": "folded", "rel": rel_error(model, spec, False)}
    except BakeError as e:
        why = str(e)
    try:
        return {"outcome": "inserted", "rel": rel_error(model, spec, True), "why": why}
    except Exception as e:  # noqa: BLE001 - reported, not raised: a sweep
        return {"outcome": "refused", "why": first_line(e)}


def one(mt: str) -> dict:
    row = {"model_type": mt, "class": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt]}
    if mt in OUT_OF_SCOPE:
        return {**row, "status": "out of scope (encoder or encoder-decoder)"}
    if mt in SKIP:
        return {**row, "status": "does not build", "why": SKIP[mt]}
    try:
        model = build(mt)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "does not build", "why": first_line(e)}
    try:
        ad = adapter_for(model)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "no family", "why": first_line(e)}
    row["family"] = "probe" if ad.about.startswith("derived") else ad.family
    row["groups"] = {g: group(model, pats, 7 + k) for k, (g, pats) in enumerate(GROUPS.items())}
    row["status"] = status(row)
    return row


def status(row: dict) -> str:
    """Judged on what folds: every folded group exact (inserted modules are run in memory here, not through
    the generated code `bake apply --insert-modules` writes, so their error is shown, not judged)."""
    folded = [r for r in row["groups"].values() if r["outcome"] == "folded"]
    if not folded:
        return "nothing folds (inserted modules only)"
    return "folds exactly" if all(r["rel"] <= 1e-5 for r in folded) else "a fold is inexact"


class Slow(Exception):
    pass


def timed(mt: str, limit: int = 120) -> dict:
    """`one(mt)`, or a row saying it took longer than `limit` seconds."""
    def stop(*_):
        raise Slow(f"over {limit} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
    try:
        return one(mt)
    except Slow as e:
        return {"model_type": mt, "status": "does not build", "why": f"Slow: {e}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def markdown(rows: list[dict], seconds: float) -> str:
    rows = sorted(rows, key=lambda r: r["model_type"])
    scope = [r for r in rows if not r["status"].startswith("out of scope")]
    built = [r for r in scope if r["status"] != "does not build"]
    for r in rows:
        if "groups" in r:
            r["status"] = status(r)
    ok = [r for r in built if r["status"] == "folds exactly"]
    lines = ["# Every causal-LM model type, tried", "", "[Back to the families](families.md).", "",
             f"`python benchmarks/families_sweep.py` ({seconds:.0f} s, transformers {tf.__version__}): of "
             f"{len(rows)} model types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(rows) - len(scope)} are "
             f"encoders or encoder-decoders (out of scope); of the {len(scope)} decoders, {len(built)} build "
             f"from a tiny config and run, bake reads {sum('groups' in r for r in built)} of them (table or probe), "
             f"and in **{len(ok)}** every random spec that folds equals the hooked reference to ≤ 1e-5 "
             f"(relative logit error). What does not fold is shown as kept in inserted modules (run in memory "
             f"here, with their error, not judged: `bake apply --insert-modules` verifies them through the "
             f"generated code).", "",
             "Cells: how the random spec at that site group was placed (relative logit error vs the hooked "
             "reference), `inserted` where it needs `--insert-modules`, or why not.", "",
             "| model type | family | post-norms | writers | residual | all sites | status |", "|---|---|---|---|---|---|---|"]
    for r in scope:
        if "groups" not in r:
            lines.append(f"| `{r['model_type']}` | – | | | | | {r['status']}: {r.get('why', '')[:90]} |")
            continue
        cells = []
        for g in GROUPS:
            c = r["groups"][g]
            cells.append({"folded": f"{c.get('rel', 0):.0e}", "inserted": f"inserted {c.get('rel', 0):.0e}",
                          "no such site": "–"}.get(c["outcome"], f"refused: {c.get('why', '')[:60]}"))
        lines.append(f"| `{r['model_type']}` | {r['family']} | " + " | ".join(cells) + f" | {r['status']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of the last run's JSON and go on")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    types = a.types.split(",") if a.types else sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    t0 = time.perf_counter()
    out = ROOT / "benchmarks" / "results" / "families_sweep.json"
    last = json.loads(out.read_text()) if a.resume and out.is_file() else {"rows": [], "seconds": 0}
    rows = last["rows"]
    done = {r["model_type"] for r in rows}
    seconds = last["seconds"]
    for mt in tqdm([t for t in types if t not in done], desc="model types"):
        rows.append(timed(mt))
        seconds = last["seconds"] + time.perf_counter() - t0  # written after every type: a crash keeps what was measured
        out.write_text(
            json.dumps({"transformers": tf.__version__, "seconds": round(seconds), "rows": rows}, indent=1) + "\n")
    if not a.types:
        (ROOT / "docs" / "families-sweep.md").write_text(markdown(rows, seconds), encoding="utf-8")
    print(markdown(rows, seconds).splitlines()[4])


if __name__ == "__main__":
    main()
