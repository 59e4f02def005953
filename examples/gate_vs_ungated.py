"""A DSAS gate around examples/detox.json (the LDA projection) vs the ungated projection, at
matched tuning perplexity: the gated λ is bisected to +7.5 % on the tuning half of FLORES (500
sentences, the edge detox.json's λ 1.39 was chosen at), then both are measured on the held-out
split (230 prefixes × 8 seeds, batch 80, and the other 500 FLORES sentences).

    python examples/gate_vs_ungated.py [OUT_DIR]     # default /tmp/gate_vs_ungated; about 35 min on 2 CPU cores
    python examples/gate_vs_ungated.py OUT_DIR --pareto 0.7,1.0 --pareto-gated 1.5,2.2

`--pareto` / `--pareto-gated` add more strengths of the ungated / gated spec on the held-out split
(plus the original model in the same run and batches, and `bake diff`'s drift on its default
benign prompts for every point) and draw OUT_DIR/pareto.png: held-out toxicity against held-out
perplexity rise and against benign-prompt KL, one curve per spec.

Resumable: OUT_DIR/results.json is rewritten after every point.
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bake.eval import EvalConfig, flores, rtp_prompts, write_json_atomic
from bake.eval.scorers import load_scorers
from bake.fit import fit, read_texts
from bake.models import load
from bake.spec import read, write
from detox_search import budget_edge  # noqa: E402
from method_table import timed_point  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("out", nargs="?", default="/tmp/gate_vs_ungated")
ap.add_argument("--pareto", default="", help="more ungated strengths, comma-separated")
ap.add_argument("--pareto-gated", default="", help="more gated strengths, comma-separated")
args = ap.parse_args()
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
out = OUT / "results.json"
doc = json.loads(out.read_text()) if out.is_file() else {}
save = lambda: write_json_atomic(out, doc)  # noqa: E731
loaded = load("llama")
model, tok = loaded.model, loaded.tokenizer
score = load_scorers("profanity,hatesonar")
base = dict(max_new_tokens=32, batch_size=80, scorer="profanity,hatesonar")
ppl_tune = EvalConfig(tasks=["perplexity"], prompts=[], sentences=flores(500, "tune"), **base)
held = EvalConfig(tasks=["toxicity", "perplexity"], prompts=rtp_prompts("heldout"), sentences=flores(500, "heldout"),
                  seeds=list(range(8)), **base)
lda = read(HERE / "detox.json")
if not (OUT / "dsas.json").is_file():
    write(lda.with_strength(1.0), OUT / "lda1.json")
    src = read_texts(HERE / "data" / "detox_fit_toxic.txt", "s")
    ctrl = read_texts(HERE / "data" / "detox_fit_benign.txt", "c")[:600]
    t0 = time.time()
    g = fit(model, tok, src, [], "dsas", control=ctrl, inner=str(OUT / "lda1.json"), provenance={"model": "llama"})
    write(g, OUT / "dsas.json")
    doc["dsas_fit"] = {"seconds": round(time.time() - t0, 1), "kept": g.params["kept_sites"],
                       "accuracy": g.params["detector_accuracy"]}
    save()
gated = read(OUT / "dsas.json")
if "ppl0" not in doc:
    doc["ppl0"] = timed_point(model, tok, ppl_tune, score)["perplexity"]["perplexity"]
    save()
limit = 1.075 * doc["ppl0"]
doc.setdefault("ppl", {})


def ppl_at(lam: float) -> float:
    """Tuning-half perplexity of the gated spec at λ (kept in the results)."""
    k = f"{lam:.6g}"
    if k not in doc["ppl"]:
        doc["ppl"][k] = timed_point(model, tok, ppl_tune, score, [gated.with_strength(lam)])["perplexity"]["perplexity"]
        save()
        print("gated", k, doc["ppl"][k], flush=True)
    return doc["ppl"][k]


if "edge" not in doc:  # the gate is open about half the time: start above the ungated λ
    doc["edge"] = budget_edge(ppl_at, limit, 1.39, 2.78, cap=20, steps=5)
    save()
if "ungated_tune_ppl" not in doc:
    doc["ungated_tune_ppl"] = timed_point(model, tok, ppl_tune, score, [lda])["perplexity"]["perplexity"]
    save()
for name, spec in (("ungated", lda), ("gated", gated.with_strength(doc["edge"]))):
    if name not in doc:
        r = timed_point(model, tok, held, score, [spec])
        r["toxicity"].pop("examples", None)
        doc[name] = r
        save()
        print(name, r["toxicity"]["toxic"], r["toxicity"]["continuations"], r["perplexity"], r["seconds"], flush=True)
if "original_ppl_held" not in doc:
    ppl_held = EvalConfig(tasks=["perplexity"], prompts=[], sentences=held.sentences, **base)
    doc["original_ppl_held"] = timed_point(model, tok, ppl_held, score)["perplexity"]["perplexity"]
    save()
print(json.dumps({k: v for k, v in doc.items() if k not in ("ungated", "gated")}, indent=1))


def drift(spec) -> dict:
    """`bake diff` on its default benign prompts: the original against the hooked reference."""
    import copy

    from bake.diff import compare, default_prompts
    from bake.runtime import steered

    twin = copy.deepcopy(model)
    with steered(twin, [spec]):
        return compare(model, twin, tok, default_prompts())["summary"]


def plot_pareto(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, p0 = doc["original"], doc["original_ppl_held"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, xlabel in zip(axes, ("FLORES perplexity rise, % (held-out half)", "bake diff mean KL on benign prompts")):
        ax.plot([0], [100 * o["toxicity"]["toxic_rate"]], "*", ms=14, color="k", label="original")
        for i, name in enumerate(("ungated", "gated")):
            pts = sorted((float(k), r) for k, r in doc["pareto"][name].items())
            xs = [100 * (r["perplexity"]["perplexity"] / p0 - 1) if ax is axes[0] else r["drift"]["kl_mean"]
                  for _, r in pts]
            ys = [100 * r["toxicity"]["toxic_rate"] for _, r in pts]
            ax.plot(xs, ys, "o-", color=f"C{i}", label="LDA projection " + ("behind DSAS gates" if i else "(folds)"))
            for (lam, _), x, y in zip(pts, xs, ys):
                ax.annotate(f"λ {lam:g}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("toxic continuations, % (held-out prefixes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = o["toxicity"]["continuations"]
    fig.suptitle(f"gated vs ungated over λ: {n} sampled held-out continuations per point (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


lams = {"ungated": [float(x) for x in args.pareto.split(",") if x],
        "gated": [float(x) for x in args.pareto_gated.split(",") if x]}
if lams["ungated"] or lams["gated"]:
    sweep = doc.setdefault("pareto", {"ungated": {}, "gated": {}})
    if "original" not in doc:  # the same prompts, seeds and batches as every point below
        r = timed_point(model, tok, held, score)
        r["toxicity"].pop("examples", None)
        doc["original"] = r
        save()
    for name, spec, grid, at in (("ungated", lda, lams["ungated"], 1.39), ("gated", gated, lams["gated"], doc["edge"])):
        pts = sweep[name]
        if f"{at:g}" not in pts and name in doc:  # the matched-budget point measured above
            pts[f"{at:g}"] = doc[name]
        for lam in grid:
            k = f"{lam:g}"
            if k not in pts:
                r = timed_point(model, tok, held, score, [spec.with_strength(lam)])
                r["toxicity"].pop("examples", None)
                pts[k] = r
                save()
                print(name, k, r["toxicity"]["toxic"], r["perplexity"], flush=True)
        for k, r in pts.items():
            if "drift" not in r:
                r["drift"] = drift(spec.with_strength(float(k)))
                save()
    plot_pareto(doc, OUT / "pareto.png")
