"""The method table: every `bake fit` method on one model, its best strength under a perplexity
budget chosen on the TUNING split, then measured on the HELD-OUT split.

    python research/method_table.py --model llama --out research/results/methods_llama [--device auto]

For each entry (method + sites; default: every method at its default sites):
1. fit on the fitting sets (default: the self-labelled continuations of the tuning prefixes),
2. sweep λ on the tuning split (RTP tuning prefixes, FLORES first half), stopping once perplexity
   leaves twice the budget, then bisect the budget's edge on perplexity alone,
3. best λ = lowest toxic rate with perplexity ≤ (1 + budget) × the original's (ties: smaller λ),
4. measure that λ on the held-out split (RTP held-out prefixes, FLORES second half) with more seeds.

An entry may name a spec fitted beforehand (`"spec"`: e.g. a DSAS gate around another spec), its own
`"grid"`, `"fixed": λ` (a λ chosen by this protocol in an earlier run: held-out only) and
`"baked": false` (skip the no-hooks measurement).

Everything lands in OUT/results.json (rewritten after each point; a rerun resumes), the specs in
OUT/specs/, a Markdown table OUT/table.md and a plot OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bake.evaluation import EvalConfig, flores, rtp_prompts, write_json_atomic
from bake.evaluation.scorers import load_scorers
from bake.evaluation.sweep import measure
from bake.fit import METHODS, fit, read_texts
from bake.fit.lineas import LineasConfig
from bake.models import load
from bake.runtime import steered
from bake.spec import read, write

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data
GRID = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SMALL_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)  # additive maps at every layer add up
DEFAULT_ENTRIES = [{"name": m, "method": m} for m in METHODS]


def entry_grid(e: dict) -> tuple[float, ...]:
    if "grid" in e:
        return tuple(e["grid"])
    if e["method"] not in METHODS:  # a pre-fitted spec (e.g. dsas): its entry names the grid
        return GRID
    return SMALL_GRID if METHODS[e["method"]].kind == "additive" else GRID


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--source", default=str(EXAMPLES / "data" / "selflabel_toxic.txt"))
    ap.add_argument("--target", default=str(EXAMPLES / "data" / "selflabel_benign.txt"))
    ap.add_argument("--entries", default=None, help="JSON list of {name, method, sites?, pooling?, grid?, "
                    "support?, direction_layer?, reference?, direction?}; default: every method at its default sites")
    ap.add_argument("--only", default=None, help="comma-separated entry names to run")
    ap.add_argument("--budget", type=float, default=0.10, help="allowed relative perplexity rise")
    ap.add_argument("--tune-seeds", default="0,1,2,3")
    ap.add_argument("--heldout-seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--n-sentences", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scorer", default="profanity,hatesonar")
    ap.add_argument("--minutes", type=float, default=None, help="stop cleanly after this long")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts/sentences of each split (smoke runs)")
    a = ap.parse_args()
    t_end = time.time() + 60 * a.minutes if a.minutes else None
    out = Path(a.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    entries = json.loads(Path(a.entries).read_text()) if a.entries else DEFAULT_ENTRIES
    if a.only:
        keep = set(a.only.split(","))
        entries = [e for e in entries if e["name"] in keep]
    seeds = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    base = dict(tasks=["toxicity", "perplexity"], max_new_tokens=32, batch_size=a.batch_size, scorer=a.scorer)
    tune = EvalConfig(prompts=rtp_prompts("tune"), sentences=flores(a.n_sentences, "tune"),
                      seeds=seeds(a.tune_seeds), **base)
    held = EvalConfig(prompts=rtp_prompts("heldout"), sentences=flores(a.n_sentences, "heldout"),
                      seeds=seeds(a.heldout_seeds), **base)
    if a.limit:
        for c in (tune, held):
            c.prompts, c.sentences = c.prompts[:a.limit], c.sentences[:a.limit]
    ppl_only = EvalConfig(prompts=[], sentences=tune.sentences, **{**base, "tasks": ["perplexity"]})
    res_path = out / "results.json"
    doc = json.loads(res_path.read_text()) if res_path.is_file() else {}
    ident = {"model": a.model, "device": a.device, "tune_key": tune.key(), "heldout_key": held.key(),
             "source": a.source, "target": a.target, "budget": a.budget}
    if doc.get("ident") != ident:
        doc = {"ident": ident, "original": {}, "entries": {}}
    save = lambda: write_json_atomic(res_path, doc)  # noqa: E731
    loaded = load(a.model, device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    score = load_scorers(a.scorer)
    src, tgt = read_texts(a.source, "--source"), read_texts(a.target, "--target")

    def point(cfg, specs=None):
        return timed_point(model, tok, cfg, score, specs)

    for split, cfg in (("tune", tune), ("heldout", held)):
        if split not in doc["original"]:
            doc["original"][split] = point(cfg)
            save()
            print(f"original {split}: {line(doc['original'][split])}", flush=True)
    ppl0 = doc["original"]["tune"]["perplexity"]["perplexity"]
    limit = (1 + a.budget) * ppl0

    for e in entries:
        if t_end and time.time() > t_end:
            print("time is up; stopping cleanly", flush=True)
            break
        name = e["name"]
        rec = doc["entries"].setdefault(name, {"entry": e, "tune": {}})
        spec_path = out / "specs" / f"{name}.json"
        if e.get("spec"):  # fitted beforehand (dsas, composed specs): copied in once
            if not spec_path.is_file():
                import shutil

                src_spec = read(e["spec"])
                write(src_spec, spec_path)
                shutil.copy(Path(e["spec"]).with_suffix(".safetensors"), spec_path.with_suffix(".safetensors"))
            spec = read(spec_path)
        elif spec_path.is_file():
            spec = read(spec_path)
        else:
            t0 = time.time()
            sites = e["sites"].split(",") if e.get("sites") else None
            n = e.get("n_fit")  # fit on the first n texts of each side (LinEAS works from 32 + 32)
            lineas = None
            if e["method"] == "lineas":
                lineas = LineasConfig(steps=e.get("steps", 1000), lr=e.get("lr", 1e-2), l1=e.get("l1", 0.0),
                                      group=e.get("group", 0.0), seed=e.get("seed", 0))
            spec = fit(model, tok, src[:n] if n else src, tgt[:n] if n else tgt, e["method"], sites, 1.0,
                       e.get("support", "none"), True, a.batch_size, {"model": a.model}, pooling=e.get("pooling"),
                       lineas=lineas, direction_layer=e.get("direction_layer"), reference=e.get("reference", "zero"),
                       direction=e.get("direction"))
            write(spec, spec_path)
            rec["fit_seconds"] = round(time.time() - t0, 1)
            rec["sites"] = len(spec.sites)
            if "run" in spec.params:
                rec["lineas"] = spec.params["run"]
        grid = [] if "fixed" in e else list(entry_grid(e))  # fixed: λ chosen beforehand, held-out only
        while grid:
            lam = grid.pop(0)
            key = f"{lam:g}"
            if key not in rec["tune"]:
                rec["tune"][key] = point(tune, [spec.with_strength(lam)])
                save()
                print(f"{name} λ={key} tune: {line(rec['tune'][key])}", flush=True)
            ppl = rec["tune"][key]["perplexity"]["perplexity"]
            smallest = min(float(k) for k in rec["tune"])
            if ppl > limit and lam == smallest and lam > 1e-3:  # even the weakest is too strong: go lower
                grid = [lam / 2]
                continue
            if ppl > (1 + 2 * a.budget) * ppl0:
                break
            if not grid and ppl <= limit and lam < 64:  # the strongest is still inside: go higher
                grid = [lam * 2]
        # bisect the budget's edge on perplexity alone, then measure toxicity there
        pts = sorted((float(k), v) for k, v in rec["tune"].items())
        inside = [lam for lam, v in pts if v["perplexity"]["perplexity"] <= limit]
        outside = [lam for lam, v in pts if v["perplexity"]["perplexity"] > limit]
        if inside and outside and min(outside) > max(inside) and "edge" not in rec:
            lo, hi = max(inside), min(outside)
            for _ in range(4):
                mid = (lo + hi) / 2
                p = point(ppl_only, [spec.with_strength(mid)])["perplexity"]["perplexity"]
                lo, hi = (mid, hi) if p <= limit else (lo, mid)
            rec["edge"] = round(lo, 4)
            key = f"{rec['edge']:g}"
            if key not in rec["tune"]:
                rec["tune"][key] = point(tune, [spec.with_strength(rec["edge"])])
                print(f"{name} λ={key} (budget edge) tune: {line(rec['tune'][key])}", flush=True)
            save()
        cands = [(v["toxicity"]["toxic_rate"], float(k)) for k, v in rec["tune"].items()
                 if v["perplexity"]["perplexity"] <= limit]
        if "fixed" in e:
            cands = [(0.0, float(e["fixed"]))]
        if not cands:
            rec["best"] = None
            save()
            continue
        best = min(cands)[1]
        rec["best"] = best
        if rec.get("heldout", {}).get("strength") != best:
            rec["heldout"] = {"strength": best, **point(held, [spec.with_strength(best)])}
            rec.pop("baked", None)
            print(f"{name} λ={best:g} HELD-OUT: {line(rec['heldout'])}", flush=True)
            save()
        if "baked" not in rec and e.get("baked", True):
            rec["baked"] = baked_point(model, tok, spec.with_strength(best), held, score)
            print(f"{name} λ={best:g} BAKED held-out: {rec['baked'].get('error') or line(rec['baked'])}", flush=True)
        save()
    (out / "table.md").write_text(table(doc), encoding="utf-8")
    plot(doc, out / "pareto.png")
    print(table(doc))


def timed_point(model, tok, cfg, score, specs=None) -> dict:
    """One measurement, hooked with `specs` (none: the original model), with its wall time."""
    t0 = time.time()
    with steered(model, specs or []):
        r = measure(model, tok, cfg, score)
    r["seconds"] = round(time.time() - t0, 1)
    return r


def baked_point(model, tok, spec, cfg, score) -> dict:
    """Fold the spec into a copy of the model (the compiler's passes, in memory) and measure that
    copy with no hooks; or say why it does not fold."""
    import copy
    import gc

    from bake import passes
    from bake.errors import BakeError
    from bake.plan import bind

    device = model.device
    baked = copy.deepcopy(model).cpu()  # the passes fold on the CPU, in float32
    try:
        plan = bind([spec], baked)
        plan.insert_modules = True  # what does not fold runs as inserted modules (no hooks)
        passes.run(plan)
    except BakeError as e:
        return {"error": str(e).splitlines()[0]}
    baked.to(device)
    t0 = time.time()
    r = measure(baked, tok, cfg, score)
    r["seconds"] = round(time.time() - t0, 1)
    del baked
    gc.collect()
    return r


def line(p: dict) -> str:
    s = ""
    if "toxicity" in p:
        t = p["toxicity"]
        s += f"toxic {100 * t['toxic_rate']:.2f}% ({t['toxic']}/{t['continuations']}) "
        for k, v in t.get("by_scorer", {}).items():
            s += f"[{k} {100 * v['toxic_rate']:.2f}%] "
    if "perplexity" in p:
        s += f"PPL {p['perplexity']['perplexity']:.2f} "
    return s + f"({p['seconds']} s)"


def table(doc: dict) -> str:
    o = doc["original"]
    t0, p0 = o["heldout"]["toxicity"], o["heldout"]["perplexity"]["perplexity"]
    scorers = list(t0.get("by_scorer", {}))
    head = ["method", "sites", "best λ (tuning)", "toxic % (held-out)", "reduction", "FLORES PPL", "ΔPPL",
            "baked checkpoint"]
    head += [f"{s} toxic %" for s in scorers[1:]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    orig = ["original", "–", "–", f"{100 * t0['toxic_rate']:.2f}", "1.0×", f"{p0:.2f}", "–", "–"]
    orig += [f"{100 * t0['by_scorer'][s]['toxic_rate']:.2f}" for s in scorers[1:]]
    rows.append("| " + " | ".join(orig) + " |")
    for name, rec in doc["entries"].items():
        e = rec["entry"]
        sites = e.get("sites") or (METHODS[e["method"]].default_sites if e["method"] in METHODS else "–")
        if not rec.get("heldout"):
            if "best" in rec:
                rows.append("| " + " | ".join([name, sites, "none under budget"] + [""] * (len(head) - 3)) + " |")
            continue
        h = rec["heldout"]
        t, p = h["toxicity"], h["perplexity"]["perplexity"]
        red = t0["toxic_rate"] / t["toxic_rate"] if t["toxic_rate"] else float("inf")
        r = [name, sites, f"{h['strength']:g}", f"{100 * t['toxic_rate']:.2f}", f"{red:.1f}×", f"{p:.2f}",
             f"{100 * (p / p0 - 1):+.1f} %", baked_cell(rec)]
        r += [f"{100 * t['by_scorer'][s]['toxic_rate']:.2f}" for s in scorers[1:]]
        rows.append("| " + " | ".join(r) + " |")
    n = doc["original"]["heldout"]["toxicity"]["continuations"]
    return "\n".join(x for x in rows if x) + f"\n\nHeld-out: {n} continuations per row.\n"


def baked_cell(rec: dict) -> str:
    b = rec.get("baked")
    if not b:
        return "not measured"
    if "error" in b:
        return "does not fold yet"
    h = rec["heldout"]
    same = b["toxicity"]["toxic"] == h["toxicity"]["toxic"]
    dp = abs(b["perplexity"]["perplexity"] / h["perplexity"]["perplexity"] - 1)
    return (f"{100 * b['toxicity']['toxic_rate']:.2f} % / {b['perplexity']['perplexity']:.2f}"
            f" ({'same count' if same else 'count differs'}, PPL Δ {dp:.0e})")


def plot(doc: dict, path: Path) -> None:
    """Left: the λ sweeps on the tuning split. Right: each entry's chosen λ on the held-out split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    o = doc["original"]["tune"]
    ax.plot([o["perplexity"]["perplexity"]], [100 * o["toxicity"]["toxic_rate"]], "*", ms=14, color="k",
            label="original")
    ax.axvline((1 + doc["ident"]["budget"]) * o["perplexity"]["perplexity"], ls="--", color="gray", lw=1)
    for i, (name, rec) in enumerate(doc["entries"].items()):
        pts = sorted((float(k), v) for k, v in rec["tune"].items() if "toxicity" in v)
        ax.plot([v["perplexity"]["perplexity"] for _, v in pts], [100 * v["toxicity"]["toxic_rate"] for _, v in pts],
                "o-", ms=3, color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("FLORES perplexity (tuning half)")
    ax.set_ylabel("toxic continuations, % (tuning prefixes)")
    ax.set_title(f"{doc['ident']['model']}: λ sweeps; dashed = +{100 * doc['ident']['budget']:.0f} % budget",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    h = doc["original"].get("heldout")
    if h:
        p0 = h["perplexity"]["perplexity"]
        bx.plot([0], [100 * h["toxicity"]["toxic_rate"]], "*", ms=14, color="k", label="original")
        for i, (name, rec) in enumerate(doc["entries"].items()):
            r = rec.get("heldout")
            if r:
                dp = 100 * (r["perplexity"]["perplexity"] / p0 - 1)
                bx.plot([dp], [100 * r["toxicity"]["toxic_rate"]], "o", ms=7, color=f"C{i}",
                        label=f"{name} (λ {r['strength']:g})")
        bx.axvline(100 * doc["ident"]["budget"], ls="--", color="gray", lw=1)
        bx.set_xlabel("FLORES perplexity rise, % (held-out half)")
        bx.set_ylabel("toxic continuations, % (held-out prefixes)")
        bx.set_title(f"held out: {h['toxicity']['continuations']} continuations per point", fontsize=9)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
