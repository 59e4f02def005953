"""Every causal-LM model type of the installed transformers, tried: which decoders bake reads (by a
family table or by the probe), whether random specs fold into them exactly, and the user's path
(`bake fit` → `bake apply` → verify) with three methods. Writes benchmarks/results/families_sweep.json
and docs/families-sweep.md.

Per model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: build a tiny random config (2 layers, hidden 32,
few heads, 4 experts: `bake.families.tiny.build`) and its ForCausalLM class; run one forward pass; types
whose base model is a masked LM (BERT-likes) or a seq2seq model (BART, Whisper, ...) are out of scope
and not counted. Then:

- the family (table or probe) and, for each site group (post-norms; attn-out + mlp-out + mlp-in;
  residual; every site), a random spec of affine / additive / projection maps
  (test_differential.random_spec) folded by the passes into a copy and compared with the hooked
  reference on random ids: exact (relative logit error <= 1e-5), or kept as inserted modules where a
  fold is refused, compared the same way;
- the protocol of the issue: the model saved with a small tokenizer, then `bake fit` with `ablate`
  (attn-out, mlp-out), `mean-act` (post-norms) and `caa` (residual), and `bake apply` of each with its
  verify (fp32 relative logit error <= 1e-5 and identical greedy continuations); where a fold is refused,
  `bake apply --insert-modules`. Outcome per method: folded / inserted (both verified), or why not.

    python benchmarks/families_sweep.py [--types llama,granite] [--resume] [--rerun failing|TYPES]

`--rerun failing` keeps the last run's rows except those of the decoders that build but did not verify
with all three methods, runs those again, and records which types a rerun covered (`reruns` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from tqdm.auto import tqdm
from transformers.models.auto import modeling_auto as auto

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bake.cli import main as bake  # noqa: E402
from bake.errors import BakeError  # noqa: E402
from bake.families import adapter_for  # noqa: E402
from bake.families.tiny import build  # noqa: E402
from conftest import TEXTS, make_tokenizer  # noqa: E402
from test_block_structures import compiled_vs_hooked  # noqa: E402
from test_differential import random_spec  # noqa: E402

GROUPS = {"post-norms": ["post-norms"], "writers": ["attn-out", "mlp-out", "mlp-in"], "residual": ["residual"],
          "all": ["**"]}
OUT_OF_SCOPE = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


SKIP = {"moshi": "its tiny config grew past 12 GB of memory in the forward pass (not investigated)"}


def group(model, patterns: list[str], seed: int) -> dict:
    have = adapter_for(model).presets
    patterns = [p for p in patterns if p in have or p == "**"]  # MoE layers have no mlp-in
    if not patterns:
        return {"outcome": "no such site"}
    try:
        spec = random_spec(model, patterns, seed)
    except BakeError:
        return {"outcome": "no such site"}
    try:
        rel, inserted = compiled_vs_hooked(model, spec)
    except Exception as e:  # noqa: BLE001 - reported, not raised: a sweep
        return {"outcome": "refused", "why": first_line(e)}
    return {"outcome": "inserted" if inserted else "folded", "rel": rel}


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
    row["layers"] = model.config.num_hidden_layers
    row["groups"] = {g: group(model, pats, 7 + k) for k, (g, pats) in enumerate(GROUPS.items())}
    try:
        row["methods"] = protocol(model)
    except Exception as e:  # noqa: BLE001 - saving or reloading the tiny model failed: a row, not the end
        row["methods"] = {m: {"outcome": "fit failed", "why": f"save/reload: {first_line(e)}"} for m in METHODS}
    row["status"] = status(row)
    return row


METHODS = {"ablate": ["--sites", "attn-out,mlp-out"], "mean-act": ["--sites", "post-norms"],
           "caa": ["--sites", "residual"]}


def protocol(model) -> dict:
    """`bake fit` → `bake apply` (verified) per method, through the CLI on the model saved to disk."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        saved(model, tmp)
        have = adapter_for(model).presets
        out = {m: one_method(tmp, m, sites_of(extra, have)) for m, extra in METHODS.items()}
        out["onnx"] = onnx_of(tmp, out["ablate"])
        return out


def saved(model, tmp: Path) -> None:
    """The model with a small tokenizer in tmp/model, and the source / target texts beside it."""
    model.save_pretrained(tmp / "model")
    make_tokenizer().save_pretrained(tmp / "model")
    (tmp / "src.txt").write_text("\n".join(TEXTS[1::2]))
    (tmp / "tgt.txt").write_text("\n".join(TEXTS[0::2]))


def onnx_of(tmp: Path, ablate: dict) -> dict:
    """The ablate spec again with `--format onnx`: exported and verified in ONNX Runtime, or why not."""
    if ablate["outcome"] not in ("folded", "inserted"):
        return {"outcome": "not tried", "why": "ablate did not bake"}
    out = tmp / "out_onnx"
    extra = ["--insert-modules", "--force"] if ablate["outcome"] == "inserted" else []
    code, why = cli(["apply", "--model", tmp / "model", "--spec", tmp / "ablate.json", "--format", "onnx",
                     "--out", out, *extra])
    if code:
        return {"outcome": "refused" if code == 2 else "failed", "why": why.removeprefix("bake: error: ")[:300]}
    v = json.loads((out / "bake_report.json").read_text()).get("verification") or {}
    v = v.get("onnx", v)  # the format's own entry where several were written
    if not v.get("passed"):
        return {"outcome": "verify failed", "why": f"max_rel {v.get('max_rel')}, greedy {v.get('greedy_same')}"}
    return {"outcome": "verified", "max_rel": v.get("max_rel"), "opset": _opset(out)}


def _opset(out: Path) -> int | None:
    info = out / "onnx_info.json"
    return json.loads(info.read_text()).get("opset") if info.is_file() else None


def sites_of(extra: list, have: dict) -> list:
    """The method's presets this model has (ablate at attn-out and mlp-out, or the one that exists)."""
    kept = [p for p in extra[1].split(",") if p in have] or extra[1].split(",")
    return [extra[0], ",".join(kept)]


def cli(args: list) -> tuple[int, str]:
    """bake's CLI in this process: (exit code, its last error line)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = bake([str(a) for a in args])
        except Exception as e:  # noqa: BLE001 - a crash is a row of the sweep, not the end of it
            return 3, first_line(e)
    lines = [ln.strip() for ln in err.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("bake: error")] or [ln for ln in lines if "%|" not in ln]
    return code, said[-1] if said else ""


def one_method(tmp: Path, method: str, extra: list) -> dict:
    spec, out = tmp / f"{method}.json", tmp / f"out_{method}"
    code, why = cli(["fit", "--model", tmp / "model", "--source", tmp / "src.txt", "--target", tmp / "tgt.txt",
                     "--method", method, *extra, "--out", spec])
    if code:
        return {"outcome": "fit failed", "why": why[:300]}
    base = ["apply", "--model", tmp / "model", "--spec", spec, "--out", out]
    code, why = cli(base)
    outcome = "folded"
    if code and "--insert-modules" in why:
        code, why2 = cli(base + ["--insert-modules", "--force"])
        outcome, why = "inserted", why if not code else why2
    if code:
        return {"outcome": "apply failed", "why": why[:300]}
    v = json.loads((out / "bake_report.json").read_text()).get("verification") or {}
    if not v.get("passed"):
        return {"outcome": "verify failed", "why": f"max_rel {v.get('max_rel')}, greedy {v.get('greedy_same')}"}
    return {"outcome": outcome, "max_rel": v.get("max_rel"), **({"why": why[:300]} if outcome == "inserted" else {})}


def status(row: dict) -> str:
    """Judged on the user's path: all three methods bake and verify (folded, or with inserted modules where
    a fold is refused); else the first method that does not, and why."""
    if "methods" not in row:  # a row of an older run
        return "not run with the fit → apply → verify protocol"
    methods = {m: r for m, r in row["methods"].items() if m in METHODS}
    bad = [(m, r) for m, r in methods.items() if r["outcome"] not in ("folded", "inserted")]
    if bad:
        m, r = bad[0]
        return f"{m}: {r['outcome']}"
    folded = all(r["outcome"] == "folded" for r in methods.values())
    return "all three fold and verify" if folded else "all three verify (some with inserted modules)"


class Slow(Exception):
    pass


@contextlib.contextmanager
def time_limit(limit: int):
    """Raise `Slow` in the block after `limit` seconds (SIGALRM)."""
    def stop(*_):
        raise Slow(f"over {limit} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def timed(mt: str, limit: int = 400) -> dict:
    """`one(mt)`, or a row saying it took longer than `limit` seconds."""
    try:
        with time_limit(limit):
            return one(mt)
    except Slow as e:
        return {"model_type": mt, "status": "does not build", "why": f"Slow: {e}"}


def cell(r: dict) -> str:
    """One method's outcome in the table."""
    if r["outcome"] in ("folded", "inserted"):
        return f"{r['outcome']} {r['max_rel']:.0e}"
    return f"{r['outcome']}: {r.get('why', '').removeprefix('bake: error: ')[:70]}"


def onnx_cell(r: dict | None) -> str:
    """The ONNX export of the ablate spec: verified (relative error, opset: 18 is the dynamo exporter), or why not."""
    if not r:
        return ""
    if r["outcome"] == "verified":
        return f"verified {r['max_rel']:.0e}" + (" (dynamo)" if r.get("opset") == 18 else "")
    why = re.sub(r"^--format onnx: (not supported for model type '[^']+': |model type '[^']+' does not export: )",
                 "", r.get("why", ""))
    return f"{r['outcome']}: {why.replace('the TorchScript tracer says ', 'tracer: ')[:90]}"


def random_cell(r: dict) -> str:
    """The random-spec groups: the worst folded error and how many groups needed inserted modules."""
    folded = [g["rel"] for g in r["groups"].values() if g["outcome"] == "folded"]
    inserted = sum(g["outcome"] == "inserted" for g in r["groups"].values())
    refused = [g for g in r["groups"].values() if g["outcome"] == "refused"]
    out = f"≤ {max(folded):.0e}" if folded else "–"
    out += f", {inserted} inserted" if inserted else ""
    return out + (f", refused: {refused[0]['why'][:50]}" if refused else "")


def markdown(rows: list[dict], seconds: float, reruns: list | None = None) -> str:
    rows = sorted(rows, key=lambda r: r["model_type"])
    for r in rows:
        if "groups" in r:
            r["status"] = status(r)
    scope = [r for r in rows if not r["status"].startswith("out of scope")]
    built = [r for r in scope if r["status"] != "does not build"]
    read = [r for r in built if "methods" in r]
    verified = [r for r in read if r["status"].startswith("all three")]
    folded = [r for r in read if r["status"] == "all three fold and verify"]
    onnx = [r for r in verified if r["methods"].get("onnx", {}).get("outcome") == "verified"]
    lines = ["# Every causal-LM model type, tried", "", "[Back to the families](families.md).", "",
             f"`python benchmarks/families_sweep.py` ({seconds:.0f} s on 2 cores, transformers {tf.__version__}): of "
             f"{len(rows)} model types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(rows) - len(scope)} are "
             f"encoders or encoder-decoders (out of scope); of the {len(scope)} decoders, {len(built)} build "
             f"from a tiny config and run, and bake reads {len(read)} of them (table or probe). With the user's "
             f"path (`bake fit` → `bake apply` → verify, for `ablate`, `mean-act` and `caa`), "
             f"**{len(verified)} of the {len(built)} ({100 * len(verified) / max(len(built), 1):.0f} %)** bake and "
             f"verify with all three methods; in {len(folded)} all three fold into stock weights, the others keep "
             f"what cannot fold as inserted modules (`--insert-modules`; the reason is in the JSON and in "
             f"`bake apply`'s refusal). Of those {len(verified)}, **{len(onnx)}** also export the ablate spec to ONNX "
             f"(`--format onnx`) and verify in ONNX Runtime; the others' reason is in the ONNX column.", "",
             "Method cells: how `bake apply` placed the fitted spec and verify's relative logit error (fp32; "
             "greedy continuations identical in every verified cell), or where it stopped. Random specs: the "
             "worst relative error of the random affine / additive / projection specs that folded, per site "
             "group (post-norms; writers; residual; every site), and how many groups needed inserted modules.",
             ""] + [rerun_line(r) for r in reruns or []] + [
             "", "| model type | family | ablate | mean-act | caa | ONNX (ablate) | random specs | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in scope:
        if "groups" not in r:
            lines.append(f"| `{r['model_type']}` | – | | | | | | {r['status']}: {r.get('why', '')[:90]} |")
            continue
        ms = r.get("methods", {})
        cells = [cell(ms[m]) if m in ms else "" for m in METHODS] + [onnx_cell(ms.get("onnx"))]
        lines.append(f"| `{r['model_type']}` | {r['family']} | " + " | ".join(cells) + f" | {random_cell(r)} | "
                     f"{r['status']} |")
    return "\n".join(lines) + "\n"


def rerun_line(r: dict) -> str:
    """One line per later run over part of the rows."""
    if r.get("onnx_only"):
        return (f"ONNX cells added by `--onnx-only` ({len(r['types'])} rows, {r['seconds']} s; transformers "
                f"{r['transformers']}).")
    what = r.get("note") or "rerun with later code (`--rerun`)"
    return (f"{what[0].upper() + what[1:]}: {', '.join(f'`{t}`' for t in r['types'])} (transformers "
            f"{r['transformers']}); the other rows are from the full run.")


def verdict(r: dict) -> dict:
    """The row `bake families --all` prints: status and a one-line reason."""
    out = {"model_type": r["model_type"], "family": r.get("family", "-"), "status": r["status"]}
    why = r.get("why", "")
    ms = {m: x for m, x in r.get("methods", {}).items() if m in METHODS}
    bad = [m for m in ms.values() if m["outcome"] not in ("folded", "inserted")]
    if bad:
        why = bad[0].get("why", "")
    elif ms and any(m["outcome"] == "inserted" for m in ms.values()):
        why = "inserted modules for " + ", ".join(k for k, m in ms.items() if m["outcome"] == "inserted")
    return {**out, "why": why.removeprefix("bake: error: ")[:200]} if why else out


def onnx_only(out: Path, types: list[str] | None) -> None:
    """The ONNX cell for rows whose ablate baked but were measured before the ONNX column existed."""
    doc = json.loads(out.read_text())
    todo = [r for r in doc["rows"] if r.get("methods", {}).get("ablate", {}).get("outcome") in ("folded", "inserted")
            and "onnx" not in r["methods"] and (types is None or r["model_type"] in types)]
    t0 = time.perf_counter()
    for r in tqdm(todo, desc="ONNX cells"):
        r["methods"]["onnx"] = timed_onnx(r)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    doc.setdefault("reruns", []).append({"types": sorted(r["model_type"] for r in todo), "onnx_only": True,
                                         "transformers": tf.__version__, "seconds": round(time.perf_counter() - t0)})
    out.write_text(json.dumps(doc, indent=1) + "\n")
    (ROOT / "docs" / "families-sweep.md").write_text(markdown(doc["rows"], doc["seconds"], doc["reruns"]),
                                                     encoding="utf-8")


def timed_onnx(row: dict, limit: int = 400) -> dict:
    """Build the tiny model again, fit ablate as the protocol does, then `onnx_of`."""
    try:
        with time_limit(limit), tempfile.TemporaryDirectory() as tmp:
            model, tmp = build(row["model_type"]), Path(tmp)
            saved(model, tmp)
            extra = sites_of(METHODS["ablate"], adapter_for(model).presets)
            code, why = cli(["fit", "--model", tmp / "model", "--source", tmp / "src.txt", "--target",
                             tmp / "tgt.txt", "--method", "ablate", *extra, "--out", tmp / "ablate.json"])
            if code:
                return {"outcome": "not tried", "why": f"ablate fit failed: {why[:200]}"}
            return onnx_of(tmp, row["methods"]["ablate"])
    except Slow as e:
        return {"outcome": "failed", "why": f"Slow: {e}"}
    except Exception as e:  # noqa: BLE001 - a row, not the end of the sweep
        return {"outcome": "failed", "why": first_line(e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of the last run's JSON and go on")
    ap.add_argument("--rerun", default=None, help="'failing' or comma-separated types: run these rows again")
    ap.add_argument("--onnx-only", action="store_true", help="add the ONNX cell to the last run's rows that "
                    "verified without one (fit ablate, apply --format onnx)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    types = a.types.split(",") if a.types else sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    t0 = time.perf_counter()
    out = ROOT / "benchmarks" / "results" / "families_sweep.json"
    last = json.loads(out.read_text()) if (a.resume or a.rerun) and out.is_file() else {"rows": [], "seconds": 0}
    if a.onnx_only:
        return onnx_only(out, a.types.split(",") if a.types else None)
    if a.rerun:
        again = ({r["model_type"] for r in last["rows"]
                  if not r["status"].startswith(("all three", "out of scope", "does not build"))}
                 if a.rerun == "failing" else set(a.rerun.split(",")))
        last["rows"] = [r for r in last["rows"] if r["model_type"] not in again]
        last.setdefault("reruns", []).append({"types": sorted(again), "transformers": tf.__version__})
    rows = last["rows"]
    done = {r["model_type"] for r in rows}
    seconds = last["seconds"]
    for mt in tqdm([t for t in types if t not in done], desc="model types"):
        rows.append(timed(mt))
        seconds = last["seconds"] + time.perf_counter() - t0  # written after every type: a crash keeps what was measured
        out.write_text(json.dumps({"transformers": tf.__version__, "seconds": round(seconds), "rows": rows,
                                   "reruns": last.get("reruns", [])}, indent=1) + "\n")
    if not a.types:
        (ROOT / "docs" / "families-sweep.md").write_text(markdown(rows, seconds, last.get("reruns")), encoding="utf-8")
        verdicts = [verdict(r) for r in sorted(rows, key=lambda r: r["model_type"])]
        (ROOT / "bake" / "data" / "families_sweep.json").write_text(
            json.dumps({"transformers": tf.__version__, "rows": verdicts}, indent=0) + "\n", encoding="utf-8")
    print(markdown(rows, seconds).splitlines()[4])


if __name__ == "__main__":
    main()
