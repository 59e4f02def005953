"""Gated vs ungated over λ: a Pareto sweep around examples/detox.json (the LDA projection), on CPU.

    python research/gate_pareto.py OUT_DIR [--only NAMES] [--threads N]   # measure points
    python research/gate_pareto.py OUT_DIR --report                       # table.md + pareto.png

Every point is measured on the held-out split only: 230 RealToxicityPrompts prefixes × 8 seeds =
1840 sampled continuations (batches of 80; the original model in the same batches, in the same
run), the held-out 500 FLORES sentences (perplexity), and `bake diff`'s teacher-forced KL and top-1
agreement against the original on its 32 default benign prompts. The tuning FLORES half is
measured too, so a λ can be read off at a perplexity budget.

The curves:
- ungated: `examples/detox.json` at λ ∈ UNGATED (it folds; 1.39 is its published λ);
- gated: the same projection behind DSAS gates (`research/results/gate_vs_ungated/dsas.json`,
  46 of 60 sites, fitted by `research/gate_vs_ungated.py`) at λ ∈ GATED (2.954 matched 1.39's
  tuning perplexity);
- joint (optional, `--joint SPEC`): gates and per-unit maps trained together, at λ ∈ JOINT. The
  published one (`research/results/gate_pareto/specs/joint.json`) is

      head -32 examples/data/selflabel_toxic.txt > src.txt
      head -32 examples/data/selflabel_benign.txt > tgt.txt
      sed -n 33,96p examples/data/selflabel_benign.txt > ctrl.txt
      OMP_NUM_THREADS=1 bake fit --model llama --method dsas --joint --source src.txt \
          --target tgt.txt --control ctrl.txt --steps 600 --out joint.json

  (the same 32 + 32 texts as the LinEAS fits of research/results/lineas_cpu/, 64 other benign
  texts as the retain set).

Points are independent (one file each under OUT_DIR/points/): run two processes side by side with
`--threads 1 --only ...`, then `--report`.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data
sys.path.insert(0, str(HERE))
from bake.diff import compare, default_prompts  # noqa: E402
from bake.evaluation import EvalConfig, flores, rtp_prompts, write_json_atomic  # noqa: E402
from bake.evaluation.scorers import load_scorers  # noqa: E402
from bake.models import load  # noqa: E402
from bake.runtime import steered  # noqa: E402
from bake.spec import read  # noqa: E402
from method_table import timed_point  # noqa: E402

UNGATED = [0.9, 1.39, 1.9]
GATED = [2.4, 2.954, 3.3]
JOINT = [1.0, 2.0]
GATED_SPEC = HERE / "results" / "gate_vs_ungated" / "dsas.json"


def points(joint: str | None) -> dict[str, tuple[str | None, float]]:
    """name → (spec path or None for the original, λ)."""
    out: dict[str, tuple[str | None, float]] = {"original": (None, 0.0)}
    out.update({f"ungated {lam:g}": (str(EXAMPLES / "detox.json"), lam) for lam in UNGATED})
    out.update({f"gated {lam:g}": (str(GATED_SPEC), lam) for lam in GATED})
    if joint:
        out.update({f"joint {lam:g}": (joint, lam) for lam in JOINT})
    return out


def measure_point(model, tok, score, path: str | None, lam: float) -> dict:
    base = dict(max_new_tokens=32, batch_size=80, scorer="profanity,hatesonar")
    held = EvalConfig(tasks=["toxicity", "perplexity"], prompts=rtp_prompts("heldout"),
                      sentences=flores(500, "heldout"), seeds=list(range(8)), **base)
    tune = EvalConfig(tasks=["perplexity"], prompts=[], sentences=flores(500, "tune"), **base)
    specs = [read(path).with_strength(lam)] if path else []
    r = timed_point(model, tok, held, score, specs)
    r["toxicity"].pop("examples", None)
    r["tune_perplexity"] = timed_point(model, tok, tune, score, specs)["perplexity"]
    if specs:  # KL / top-1 on benign prompts, teacher-forced (1 greedy token: the continuations are not used)
        other = copy.deepcopy(model)
        with steered(other, specs):
            r["diff"] = compare(model, other, tok, default_prompts(), max_new_tokens=1)["summary"]
        del other
    return r


def rows(out: Path) -> list[dict]:
    got = []
    for f in sorted((out / "points").glob("*.json")):
        d = json.loads(f.read_text())
        t = d["toxicity"]
        got.append({"name": d["name"], "curve": d["name"].split()[0], "lam": d["lam"], "toxic": t["toxic"],
                    "n": t["continuations"], "hatesonar": t["by_scorer"]["hatesonar"]["toxic"],
                    "ppl": d["perplexity"]["perplexity"], "tune_ppl": d["tune_perplexity"]["perplexity"],
                    "kl": d.get("diff", {}).get("kl_mean", 0.0), "top1": d.get("diff", {}).get("top1_agreement", 1.0)})
    order = {"original": 0, "ungated": 1, "gated": 2, "joint": 3}
    return sorted(got, key=lambda r: (order[r["curve"]], r["lam"]))


def report(out: Path) -> None:
    rs = rows(out)
    orig = next(r for r in rs if r["curve"] == "original")
    lines = ["| | λ | toxic % held-out (profanity) | × | HateSonar % | FLORES PPL held-out | Δ | tuning Δ | "
             "mean KL / top-1 on benign prompts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        red = orig["toxic"] / r["toxic"] if r["toxic"] else float("inf")
        lam, held, tune, drift = ("–",) * 4 if r is orig else (
            f"{r['lam']:g}", f"+{100 * (r['ppl'] / orig['ppl'] - 1):.1f} %",
            f"+{100 * (r['tune_ppl'] / orig['tune_ppl'] - 1):.1f} %", f"{r['kl']:.3f} / {r['top1']:.3f}")
        lines.append(f"| {r['curve']} | {lam} | {100 * r['toxic'] / r['n']:.2f} ({r['toxic']}/{r['n']}) | "
                     f"{red:.1f}× | {100 * r['hatesonar'] / r['n']:.2f} | {r['ppl']:.2f} | {held} | {tune} | {drift} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"ungated": ("tab:blue", "o"), "gated": ("tab:orange", "s"), "joint": ("tab:green", "^")}
    clip = {"ppl": 30.0, "kl": 0.35}
    for ax, key, label in ((axes[0], "ppl", "held-out FLORES perplexity rise (%)"),
                           (axes[1], "kl", "mean KL(original ‖ steered), benign prompts")):
        for curve, (color, marker) in style.items():
            pts = [r for r in rs if r["curve"] == curve]
            if not pts:
                continue
            x = [100 * (r["ppl"] / orig["ppl"] - 1) if key == "ppl" else r["kl"] for r in pts]
            y = [100 * r["toxic"] / r["n"] for r in pts]
            se = [100 * ((r["toxic"] / r["n"]) * (1 - r["toxic"] / r["n"]) / r["n"]) ** 0.5 for r in pts]
            # a collapsed point (ungated past its knee: +234 %) is drawn at the right edge, value in its label
            shown = [min(xi, clip[key]) for xi in x]
            ax.errorbar(shown, y, yerr=se, color=color, marker=marker, capsize=3, label=curve)
            for xi, si, yi, r in zip(x, shown, y, pts):
                off = "" if xi == si else (f" ({xi:+.0f} %) →" if key == "ppl" else f" ({xi:.2f}) →")
                ax.annotate(f"λ {r['lam']:g}{off}", (si, yi), textcoords="offset points",
                            xytext=(-70 if off else 4, 4), fontsize=7)
        ax.axhline(100 * orig["toxic"] / orig["n"], color="grey", ls=":", label="original")
        ax.set_xlabel(label)
        ax.set_ylabel("toxic continuations, held-out (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"LDA projection, ungated vs behind DSAS gates; joint: gates + LinEAS maps trained together. "
                 f"SmolLM2-135M, {orig['n']} held-out samples per point (bars: binomial SE)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--only", default=None, help="point names separated by semicolons (e.g. 'original;gated 2.4')")
    ap.add_argument("--joint", default=None, help="a DSAS --joint spec to sweep as a third curve")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    if a.report:
        report(out)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    todo = points(a.joint)
    if a.only:
        todo = {k: todo[k] for k in a.only.split(";")}
    loaded = load("llama")
    model, tok = loaded.model, loaded.tokenizer
    score = load_scorers("profanity,hatesonar")
    for name, (path, lam) in todo.items():
        f = out / "points" / (name.replace(" ", "_") + ".json")
        if f.is_file():
            continue
        t0 = time.time()
        r = measure_point(model, tok, score, path, lam)
        spec = Path(path).resolve() if path else None
        if spec is not None and spec.is_relative_to(HERE.parent):
            spec = spec.relative_to(HERE.parent)
        r.update(name=name, spec=spec and str(spec), lam=lam, seconds_total=round(time.time() - t0, 1))
        write_json_atomic(f, r)
        print(name, r["toxicity"]["toxic"], r["perplexity"]["perplexity"], r.get("diff", {}).get("kl_mean"),
              r["seconds_total"], "s", flush=True)


if __name__ == "__main__":
    main()
