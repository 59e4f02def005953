"""Refusal removal by other steering methods, for the record: AcT-style per-unit affine maps and LinEAS
beside abliteration (the searched spec, and a search that also draws the rank), on one model, the same
fit prompts and one held-out evaluation. Writes benchmarks/results/refusal_methods_qwen.json and
docs/refusal-methods.png.

    bake search --model qwen --trials 8 --startup-trials 4 --n-prompts 16 --max-new-tokens 24 \\
        --max-kl 0.05 --orthogonalize --norm-preserving --max-rank 3 --out ~/.cache/bake/qsearch_rank
    python benchmarks/refusal_methods.py [--rank-search ~/.cache/bake/qsearch_rank] \\
        [--n-heldout 30 --heldout-tokens 32 --lineas-steps 100]

Every method fits on the chat-formatted fit split (HarmBench = source, harmless = target; template's
own system turn), every point is scored on the held-out split by `bake.evaluation.refusal` (heretic's
marker rule, the opening rule, benign over-refusal, heretic's first-token KL), greedy. Points:

- `ablate`, searched: `examples/abliterate.json` (bake search, benchmarks/abliteration_vs_heretic.py);
- `ablate`, rank searched: the chosen spec of `--rank-search` (a `bake search --max-rank` directory);
- `ablate` with the searched spec's parameters (kernel, per-layer directions, orthogonalised,
  norm-preserving) but a rank-2 and a rank-3 subspace: rank alone changed;
- `linear-act` (AcT's per-unit transport line) at every norm output, pooled by mean and by last token;
- `mean-act` (per-unit mean shift) at every norm output, last token;
- `linear-act`, last token, at λ = 0.25 and 0.5 (nearer abliteration's drift);
- `lineas` (per-unit affine maps at every norm output, trained jointly), `--lineas-steps` steps, mean
  pooling (its default) and last token.
Each point is written when done; a rerun skips finished points."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "refusal_methods_qwen.json"
PLOT = ROOT / "docs" / "refusal-methods.png"


def fitted(loaded, method: str, pooling: str | None, steps: int, **options):
    """One method's spec on the fit split (chat-formatted, the template's system turn)."""
    from bake.evaluation.refusal_data import prompts
    from bake.fit import FitConfig, LineasConfig, fit

    extra = {"lineas": LineasConfig(steps=steps, seed=0)} if method == "lineas" else {}
    cfg = FitConfig(method, pooling=pooling, chat=True, **extra, **options)
    return fit(loaded.model, loaded.tokenizer, prompts("harmful", "fit"), prompts("harmless", "fit"), cfg)


def points(a) -> list[tuple[str, dict]]:
    """(label, how) of every point: a spec file, or a method to fit (with FitConfig options)."""
    from bake.spec import read

    out = [("original", {}), ("ablate, searched (examples/abliterate.json)", {"file": ROOT / "examples" /
                                                                              "abliterate.json"})]
    if a.rank_search:
        out.append(("ablate, rank searched (bake search --max-rank 3)", {"file": Path(a.rank_search) / "chosen.json"}))
    kernel = read(ROOT / "examples" / "abliterate.json").params["kernel"]
    for k in (2, 3):  # the searched parameters, a rank-k subspace removed instead of one direction
        out.append((f"ablate, abliterate.json's kernel at rank {k}",
                    {"method": "ablate", "pooling": "last", "direction": "mean", "layer_directions": True,
                     "kernel": kernel, "orthogonalize": True, "norm_preserving": True, "rank": k}))
    out += [("linear-act (AcT), mean pooling", {"method": "linear-act", "pooling": "mean"}),
            ("linear-act (AcT), last token", {"method": "linear-act", "pooling": "last"}),
            ("mean-act, last token", {"method": "mean-act", "pooling": "last"}),
            (f"lineas, {a.lineas_steps} steps", {"method": "lineas", "pooling": None}),
            (f"lineas, last token, {a.lineas_steps} steps", {"method": "lineas", "pooling": "last"})]
    for lam in (0.25, 0.5):  # AcT where its drift is nearer abliteration's
        out.append((f"linear-act (AcT), last token, λ={lam:g}", {"method": "linear-act", "pooling": "last",
                                                                "strength": lam}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--rank-search", default=None, help="a `bake search --max-rank` output directory")
    ap.add_argument("--n-heldout", type=int, default=30)
    ap.add_argument("--heldout-tokens", type=int, default=32)
    ap.add_argument("--lineas-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--plot", default=str(PLOT))
    a = ap.parse_args()
    result = Path(a.out)
    import torch

    from bake.evaluation import EvalConfig, refusal_sets, write_json_atomic
    from bake.evaluation.refusal import refusal
    from bake.models import load
    from bake.runtime import steered
    from bake.spec import read

    loaded = load(a.model)
    harmful, benign, harmless = refusal_sets("heldout", a.n_heldout)
    cfg = EvalConfig(tasks=["refusal"], prompts=[], sentences=[], max_new_tokens=a.heldout_tokens,
                     batch_size=a.batch_size, refusal_harmful=harmful, refusal_benign=benign,
                     refusal_harmless=harmless)
    doc = json.loads(result.read_text()) if result.is_file() else {}
    if doc.get("settings") != (settings := {"model": a.model, "prompts": a.n_heldout, "tokens": a.heldout_tokens}):
        doc = {"settings": settings, "points": {}}
    base = None
    for label, how in points(a):
        if label in doc["points"] and label != "original":
            continue
        t0 = time.perf_counter()
        spec = read(how["file"]) if "file" in how else fitted(loaded, steps=a.lineas_steps, **how) if how else None
        fit_s = time.perf_counter() - t0
        with steered(loaded.model, [spec]) if spec else torch.no_grad():
            r = refusal(loaded.model, loaded.tokenizer, cfg, base)
        if base is None:
            base = r["first_token_logprobs"]
        doc["points"][label] = {"refusals": r["harmful"]["refusals"], "prompts": r["harmful"]["prompts"],
                                "opening_rate": r["harmful"]["opening_refusal_rate"],
                                "benign_rate": r["benign"]["refusal_rate"], "kl": r["harmless_kl"],
                                "fit_seconds": round(fit_s), "seconds": round(time.perf_counter() - t0),
                                "sites": len(spec.sites) if spec else 0,
                                "examples": [e["response"] for e in r["harmful"]["examples"][:3]]}
        write_json_atomic(result, doc)
        print(f"{label}: {doc['points'][label]['refusals']}/{a.n_heldout} refusals, KL {r['harmless_kl']:.4f}, "
              f"benign {100 * r['benign']['refusal_rate']:.0f}%", flush=True)
    plot(doc, Path(a.plot))


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, p in doc["points"].items():
        ax.plot([max(p["kl"], 1e-4)], [p["refusals"]], "o")
        ax.annotate(label, (max(p["kl"], 1e-4), p["refusals"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("first-token KL on harmless prompts (held-out; original drawn at 1e-4)")
    ax.set_ylabel(f"refusals of {doc['settings']['prompts']} held-out HarmBench prompts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
