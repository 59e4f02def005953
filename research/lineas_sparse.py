"""LinEAS from 32 + 32 texts, dense vs sparse (and Linear-AcT from the same texts), on CPU.

    python research/lineas_sparse.py OUT_DIR [--only NAMES] [--fit-only] [--threads N]

Each entry is fitted on the first 32 self-labelled toxic and 32 benign continuations
(`examples/data/selflabel_*.txt`, post-norms, 1000 Adam steps for LinEAS); its λ is bisected on
perplexity alone to the +10 % edge on the tuning half of FLORES (500 sentences); that λ is then
measured on the held-out split: 230 RealToxicityPrompts prefixes × 8 seeds = 1840 continuations,
sampled in batches of 32 with the original model measured on the same seeds in the same run, and
the other 500 FLORES sentences.

`--fit-only` fits and stops (run two fits side by side with `--threads 1` each, then evaluate).
Resumable: OUT_DIR/results.json is rewritten after every point; specs land in OUT_DIR/specs/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data
sys.path.insert(0, str(HERE))
from bake.evaluation import EvalConfig, flores, rtp_prompts, write_json_atomic  # noqa: E402
from bake.evaluation.scorers import load_scorers  # noqa: E402
from bake.fit import fit, read_texts  # noqa: E402
from bake.fit.lineas import LineasConfig  # noqa: E402
from bake.models import load  # noqa: E402
from bake.spec import read, write  # noqa: E402
from detox_search import budget_edge  # noqa: E402
from method_table import line, timed_point  # noqa: E402

ENTRIES = [
    {"name": "lineas dense", "method": "lineas"},
    {"name": "lineas l1 0.92 group 0.02", "method": "lineas", "l1": 0.92, "group": 0.02, "hi": 4.0},
    {"name": "lineas l1 0.945 group 0.02", "method": "lineas", "l1": 0.945, "group": 0.02, "hi": 4.0},
    {"name": "linear-act", "method": "linear-act"},
]
N_FIT = 32
BUDGET = 0.10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--only", default=None, help="entry names separated by semicolons")
    ap.add_argument("--fit-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    entries = ENTRIES
    if a.only:
        keep = set(a.only.split(";"))
        entries = [e for e in entries if e["name"] in keep]
    loaded = load("llama")
    model, tok = loaded.model, loaded.tokenizer
    src = read_texts(EXAMPLES / "data" / "selflabel_toxic.txt", "source")[:N_FIT]
    tgt = read_texts(EXAMPLES / "data" / "selflabel_benign.txt", "target")[:N_FIT]
    for e in entries:  # fitting writes only the spec (and its run summary beside it)
        path = out / "specs" / f"{e['name']}.json"
        if path.is_file():
            continue
        t0 = time.time()
        lineas = LineasConfig(l1=e.get("l1", 0.0), group=e.get("group", 0.0)) if e["method"] == "lineas" else None
        spec = fit(model, tok, src, tgt, e["method"], None, 1.0, batch_size=32, provenance={"model": "llama"},
                   lineas=lineas, progress=False)
        spec.params["fit_seconds"] = round(time.time() - t0, 1)
        write(spec, path)
        print(e["name"], "fitted in", spec.params["fit_seconds"], "s", spec.params.get("run", ""), flush=True)
    if a.fit_only:
        return

    res = out / "results.json"
    doc = json.loads(res.read_text()) if res.is_file() else {}
    save = lambda: write_json_atomic(res, doc)  # noqa: E731
    score = load_scorers("profanity,hatesonar")
    base = dict(max_new_tokens=32, scorer="profanity,hatesonar")
    ppl_tune = EvalConfig(tasks=["perplexity"], prompts=[], sentences=flores(500, "tune"), batch_size=32, **base)
    ppl_held = EvalConfig(tasks=["perplexity"], prompts=[], sentences=flores(500, "heldout"), batch_size=32, **base)
    tox_held = EvalConfig(tasks=["toxicity"], prompts=rtp_prompts("heldout"), sentences=[], seeds=list(range(8)),
                          batch_size=32, **base)
    if "original" not in doc:
        doc["original"] = {"ppl_tune": timed_point(model, tok, ppl_tune, score)["perplexity"]["perplexity"],
                           "ppl_held": timed_point(model, tok, ppl_held, score)["perplexity"]["perplexity"]}
        save()
    if "toxicity" not in doc["original"]:
        doc["original"]["toxicity"] = timed_point(model, tok, tox_held, score)["toxicity"]
        doc["original"]["toxicity"].pop("examples", None)
        save()
    limit = (1 + BUDGET) * doc["original"]["ppl_tune"]
    for e in entries:
        name = e["name"]
        spec = read(out / "specs" / f"{name}.json")
        rec = doc.setdefault(name, {"entry": e, "ppl": {}})
        rec["run"] = spec.params.get("run")
        rec["fit_seconds"] = spec.params.get("fit_seconds")

        def ppl_at(lam: float) -> float:
            k = f"{lam:.6g}"
            if k not in rec["ppl"]:
                rec["ppl"][k] = timed_point(model, tok, ppl_tune, score, [spec.with_strength(lam)])["perplexity"]["perplexity"]
                save()
                print(name, "λ", k, "tuning PPL", round(rec["ppl"][k], 3), flush=True)
            return rec["ppl"][k]

        if "edge" not in rec:
            rec["edge"] = budget_edge(ppl_at, limit, 0.0, e.get("hi", 0.25), cap=256, steps=4)
            save()
        lam = rec["edge"]
        if "heldout" not in rec:
            r = timed_point(model, tok, tox_held, score, [spec.with_strength(lam)])
            r["toxicity"].pop("examples", None)
            r["ppl_held"] = timed_point(model, tok, ppl_held, score, [spec.with_strength(lam)])["perplexity"]["perplexity"]
            rec["heldout"] = r
            save()
            print(name, "λ", lam, "HELD-OUT:", line(r), "PPL held", round(r["ppl_held"], 3), flush=True)
    (out / "table.md").write_text(table(doc), encoding="utf-8")
    plot(doc, out / "pareto.png")
    print(table(doc))


def table(doc: dict) -> str:
    o = doc["original"]
    t0, p0 = o["toxicity"], o["ppl_held"]
    rows = ["| fit (32 + 32) | active units / sites | λ (+10 % tuning edge) | toxic % (held-out) | × | "
            "HateSonar % | ΔPPL held-out | reduction kept vs dense | fit s |", "|" + "---|" * 9,
            f"| original | – | – | {100 * t0['toxic_rate']:.2f} ({t0['toxic']}/{t0['continuations']}) | 1.0× | "
            f"{100 * t0['by_scorer']['hatesonar']['toxic_rate']:.2f} | ({p0:.2f}) | – | – |"]
    dense = doc.get("lineas dense", {}).get("heldout")
    for name, rec in doc.items():
        if name == "original" or "heldout" not in rec:
            continue
        t, run = rec["heldout"]["toxicity"], rec.get("run") or {}
        act = f"{run['active_units']:,} ({100 * run['active_units'] / run['units']:.1f} %) / {run['active_sites']}" \
            if run else "all"
        kept = "–"
        if dense and name != "lineas dense":
            d = t0["toxic_rate"] - dense["toxicity"]["toxic_rate"]
            kept = f"{100 * (t0['toxic_rate'] - t['toxic_rate']) / d:.0f} %" if d > 0 else "–"
        x = t0["toxic_rate"] / t["toxic_rate"] if t["toxic_rate"] else float("inf")
        rows.append(f"| {name} | {act} | {rec['edge']:g} | {100 * t['toxic_rate']:.2f} ({t['toxic']}) | {x:.1f}× | "
                    f"{100 * t['by_scorer']['hatesonar']['toxic_rate']:.2f} | "
                    f"{100 * (rec['heldout']['ppl_held'] / p0 - 1):+.1f} % | {kept} | {rec.get('fit_seconds')} |")
    return "\n".join(rows) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Left: tuning-half perplexity against λ (the edge search). Right: held-out toxicity against
    held-out perplexity rise, one point per fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    o = doc["original"]
    ax.axhline(100 * BUDGET, ls="--", color="gray", lw=1)
    bx.plot([0], [100 * o["toxicity"]["toxic_rate"]], "*", ms=14, color="k", label="original")
    for i, (name, rec) in enumerate((k, v) for k, v in doc.items() if k != "original"):
        pts = sorted((float(k), v) for k, v in rec.get("ppl", {}).items())
        ax.plot([k for k, _ in pts], [100 * (v / o["ppl_tune"] - 1) for _, v in pts], "o-", ms=3, color=f"C{i}",
                label=name)
        if "heldout" in rec:
            r = rec["heldout"]
            bx.plot([100 * (r["ppl_held"] / o["ppl_held"] - 1)], [100 * r["toxicity"]["toxic_rate"]], "o", ms=8,
                    color=f"C{i}", label=f"{name} (λ {rec['edge']:g})")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("λ")
    ax.set_ylabel("FLORES perplexity rise, % (tuning half)")
    ax.set_title("λ bisected to the +10 % edge (dashed)", fontsize=9)
    bx.set_xlabel("FLORES perplexity rise, % (held-out half)")
    bx.set_ylabel("toxic continuations, % (held-out prefixes)")
    bx.set_title(f"held out: {o['toxicity']['continuations']} sampled continuations per point", fontsize=9)
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
