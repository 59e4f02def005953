"""Search for a detox spec with a clean three-way split: fit, select, report.

    python research/detox_search.py --model llama --out research/results/detox_search --device cuda

The method table (`method_table.py`) fits on continuations of the tuning prefixes and reads toxicity
on those same prefixes, so its tuning toxic rates are in-sample. Here the tuning prefixes are split
in two (interleaved): the model's own continuations of the FIT half, labelled by the scorer, are the
fitting sets; the SELECT half decides between variants; the HELD-OUT prefixes and the other FLORES
half only report. For every variant:

1. fit on the fitting sets,
2. bisect λ to the edge of the selection budget on the tuning half of FLORES (perplexity only; the
   budget is tighter than the 10 % target because the held-out half is measured to be more
   sensitive, 1.2–1.5× the relative rise on this model),
3. sample the SELECT prefixes at that λ.

The variant with the lowest SELECT toxic rate is the pick; the pick (and the next best, for
context) is measured on the held-out split, hooked and folded into the weights with no hooks.
Everything lands in OUT/results.json (rewritten after each point; a rerun resumes), the fitting sets
in OUT/data/, specs in OUT/specs/, a table OUT/table.md and a plot OUT/search.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bake.evaluation import EvalConfig, flores, rtp_prompts, write_json_atomic, write_text_atomic
from bake.evaluation.scorers import load_scorers
from bake.evaluation.tasks import continuations
from bake.fit import fit, read_texts
from bake.maps import Map
from bake.models import load
from bake.spec import Spec, read, write

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from method_table import baked_point, line, timed_point  # noqa: E402

LAYERS = 30  # SmolLM2-135M; the windows below name its layers
WRITES = ("model.layers.{i}.self_attn.o_proj:output", "model.layers.{i}.mlp.down_proj:output")


def window(lo: int, hi: int) -> str:
    return ",".join(w.format(i=i) for i in range(lo, hi + 1) for w in WRITES)


# name → how to fit it; "rank2" stacks the directions of two layers into one rank-2 projection
# "direction": mean = μs − μt (classic abliteration), lda = Σ⁻¹(μs − μt) with Σ the diagonal
# within-class covariance (`bake fit --method ablate --direction lda`, the default since this search)
VARIANTS = [
    {"name": "ablate L15", "method": "ablate", "direction_layer": 15, "direction": "mean"},
    {"name": "ablate L22", "method": "ablate", "direction_layer": 22, "direction": "mean"},
    {"name": "ablate L15, last-token", "method": "ablate", "direction_layer": 15, "direction": "mean", "pooling": "last"},
    {"name": "ablate L15, lda", "method": "ablate", "direction_layer": 15, "direction": "lda"},
    {"name": "ablate L22, lda", "method": "ablate", "direction_layer": 22, "direction": "lda"},
    {"name": "caa residual", "method": "caa"},
    {"name": "ablate rank-2 L15+L22", "method": "ablate", "rank2": [15, 22], "direction": "mean"},
    {"name": "ablate L12", "method": "ablate", "direction_layer": 12, "direction": "mean"},
    {"name": "ablate L15, writes 8-29", "method": "ablate", "direction_layer": 15, "direction": "mean",
     "sites": window(8, 29)},
]


def self_label(model, tok, prompts, seeds, batch_size, score, out: Path, benign_below=0.1, max_benign=2000):
    """The model's own continuations of `prompts`, split by the scorer (resumable: kept on disk)."""
    tox, ben = out / "fit_toxic.txt", out / "fit_benign.txt"
    if tox.is_file() and ben.is_file():
        return read_texts(tox, "fit_toxic"), read_texts(ben, "fit_benign")
    cfg = EvalConfig(tasks=["toxicity"], prompts=prompts, sentences=[], batch_size=batch_size)
    texts = []
    for seed in seeds:  # offset by 1000: never an evaluation seed
        conts, _, _ = continuations(model, tok, prompts, cfg, 1000 + seed)
        texts += [" ".join(c.split()) for c in conts]
    texts = [t for t in texts if t]
    scores = score(texts)
    toxic = [t for t, s in zip(texts, scores) if s > 0.5]
    benign = [t for t, s in zip(texts, scores) if s < benign_below][:max_benign]
    write_text_atomic(tox, "\n".join(toxic) + "\n")
    write_text_atomic(ben, "\n".join(benign) + "\n")
    print(f"self-labelled {len(texts)} continuations of {len(prompts)} fit prefixes: {len(toxic)} toxic, "
          f"{len(benign)} benign kept", flush=True)
    return toxic, benign


def budget_edge(ppl_at, limit: float, lo: float, hi: float, cap: float, steps: int) -> float:
    """The largest λ whose perplexity stays ≤ limit: double hi until it leaves (or reaches cap),
    then bisect `steps` times on perplexity alone (assumed to rise with λ)."""
    while ppl_at(hi) <= limit and hi < cap:
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ppl_at(mid) <= limit else (lo, mid)
    return float(f"{lo:.4g}")


def fit_variant(model, tok, v: dict, src, tgt, batch_size, model_name) -> Spec:
    sites = v["sites"].split(",") if v.get("sites") else None
    kw = dict(pooling=v.get("pooling"), progress=False)
    if v.get("rank2"):
        specs = [fit(model, tok, src, tgt, "ablate", sites, 1.0, batch_size=batch_size, provenance={"model": model_name},
                     direction_layer=layer, direction=v.get("direction"), **kw) for layer in v["rank2"]]
        U = torch.linalg.qr(torch.cat([s.sites[0][1][0].tensors["U"].double() for s in specs], 1))[0].float()
        spec = specs[0]
        spec.sites = [(name, [Map("projection", 1.0, {"U": U})]) for name, _ in spec.sites]
        spec.params["direction_site"] = [s.params["direction_site"] for s in specs]
        return spec
    return fit(model, tok, src, tgt, v["method"], sites, 1.0, batch_size=batch_size, provenance={"model": model_name},
               direction_layer=v.get("direction_layer"), direction=v.get("direction"), **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fit-seeds", type=int, default=48, help="seeds of self-labelled continuations of the fit half")
    ap.add_argument("--select-seeds", type=int, default=16)
    ap.add_argument("--heldout-seeds", type=int, default=16)
    ap.add_argument("--n-sentences", type=int, default=500, help="FLORES sentences per half")
    ap.add_argument("--budget", type=float, default=0.10, help="the target: held-out perplexity rise")
    ap.add_argument("--select-budget", type=float, default=0.075, help="the edge λ is bisected to, tuning half")
    ap.add_argument("--batch-size", type=int, default=80)
    ap.add_argument("--scorer", default="profanity,hatesonar")
    ap.add_argument("--only", default=None, help="variant names separated by semicolons")
    ap.add_argument("--report", type=int, default=2, help="how many of the best variants to measure held out")
    ap.add_argument("--minutes", type=float, default=None, help="fit no new variant after this long")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts/sentences (smoke runs)")
    a = ap.parse_args()
    t_end = time.time() + 60 * a.minutes if a.minutes is not None else None
    out = Path(a.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    tune = rtp_prompts("tune")
    fit_p, sel_p, held_p = tune[0::2], tune[1::2], rtp_prompts("heldout")
    s_tune, s_held = flores(a.n_sentences, "tune"), flores(a.n_sentences, "heldout")
    if a.limit:
        fit_p, sel_p, held_p, s_tune, s_held = (x[:a.limit] for x in (fit_p, sel_p, held_p, s_tune, s_held))
    base = dict(max_new_tokens=32, batch_size=a.batch_size, scorer=a.scorer)
    select = EvalConfig(tasks=["toxicity"], prompts=sel_p, sentences=[], seeds=list(range(a.select_seeds)), **base)
    ppl_tune = EvalConfig(tasks=["perplexity"], prompts=[], sentences=s_tune, **base)
    held = EvalConfig(tasks=["toxicity", "perplexity"], prompts=held_p, sentences=s_held,
                      seeds=list(range(a.heldout_seeds)), **base)
    variants = [v for v in VARIANTS if not a.only or v["name"] in a.only.split(";")]

    res_path = out / "results.json"
    ident = {"model": a.model, "device": a.device, "select_key": select.key(), "ppl_key": ppl_tune.key(),
             "heldout_key": held.key(), "fit_seeds": a.fit_seeds, "select_budget": a.select_budget,
             "budget": a.budget, "limit": a.limit}
    doc = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if doc.get("ident") != ident:
        doc = {"ident": ident, "original": {}, "variants": {}}
    save = lambda: write_json_atomic(res_path, doc)  # noqa: E731
    loaded = load(a.model, device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    score = load_scorers(a.scorer)
    src, tgt = self_label(model, tok, fit_p, range(a.fit_seeds), a.batch_size, next(iter(score.values())),
                          out / "data")
    doc["fitting_sets"] = {"fit_prefixes": len(fit_p), "toxic": len(src), "benign": len(tgt)}

    def point(cfg, spec=None):
        return timed_point(model, tok, cfg, score, [spec] if spec else None)

    for name, cfg in (("select", select), ("ppl_tune", ppl_tune), ("heldout", held)):
        if name not in doc["original"]:
            doc["original"][name] = point(cfg)
            save()
            print(f"original {name}: {line(doc['original'][name])}", flush=True)
    ppl0 = doc["original"]["ppl_tune"]["perplexity"]["perplexity"]
    limit = (1 + a.select_budget) * ppl0

    for v in variants:
        if t_end and time.time() > t_end:
            print("time is up; stopping cleanly", flush=True)
            break
        rec = doc["variants"].setdefault(v["name"], {"variant": v, "ppl": {}})
        spec_path = out / "specs" / (v["name"].replace(" ", "_").replace(",", "").replace("+", "-") + ".json")
        if spec_path.is_file():
            spec = read(spec_path)
        else:
            t0 = time.time()
            spec = fit_variant(model, tok, v, src, tgt, a.batch_size, a.model)
            write(spec, spec_path)
            rec["fit_seconds"] = round(time.time() - t0, 1)
            rec["sites"] = len(spec.sites)
            save()
        rec["spec"] = spec_path.name

        def ppl_at(lam: float) -> float:
            key = f"{lam:.6g}"
            if key not in rec["ppl"]:
                rec["ppl"][key] = point(ppl_tune, spec.with_strength(lam))["perplexity"]["perplexity"]
                save()
            return rec["ppl"][key]

        if "edge" not in rec:
            rec["edge"] = budget_edge(ppl_at, limit, 0.0, 0.02, cap=64, steps=7)
            save()
        if "select" not in rec and rec["edge"] > 0:
            rec["select"] = point(select, spec.with_strength(rec["edge"]))
            save()
        print(f"{v['name']}: edge λ {rec['edge']:g} (tuning PPL {ppl_at(rec['edge']):.2f}, limit {limit:.2f}); "
              f"select {line(rec['select']) if 'select' in rec else 'none'}", flush=True)

    ranked = sorted((r["select"]["toxicity"]["toxic_rate"], n) for n, r in doc["variants"].items() if "select" in r)
    doc["ranking"] = [n for _, n in ranked]
    if ranked:  # --minutes bounds the variants; the pick is always measured held out
        doc["pick"] = ranked[0][1]
        for n in doc["ranking"][:a.report]:
            rec = doc["variants"][n]
            spec = read(out / "specs" / rec["spec"]).with_strength(rec["edge"])
            if "heldout" not in rec:
                rec["heldout"] = point(held, spec)
                save()
                print(f"{n} λ={rec['edge']:g} HELD-OUT: {line(rec['heldout'])}", flush=True)
            if "baked" not in rec:
                rec["baked"] = baked_point(model, tok, spec, held, score)
                save()
                print(f"{n} λ={rec['edge']:g} BAKED held-out: {rec['baked'].get('error') or line(rec['baked'])}",
                      flush=True)
    save()
    write_text_atomic(out / "table.md", table(doc))
    plot(doc, out / "search.png")
    print(table(doc))


def table(doc: dict) -> str:
    o = doc["original"]
    s0 = o["select"]["toxicity"]["toxic_rate"]
    h0, p0 = o["heldout"]["toxicity"], o["heldout"]["perplexity"]["perplexity"]
    pt0 = o["ppl_tune"]["perplexity"]["perplexity"]
    rows = ["| variant | sites | edge λ | ΔPPL tuning half | toxic % select | × select | toxic % held-out | × held-out "
            "| ΔPPL held-out half | hatesonar held-out % | baked = hooked |", "|" + "---|" * 11,
            f"| original | – | – | ({pt0:.2f}) | {100 * s0:.2f} | 1.0× | {100 * h0['toxic_rate']:.2f} "
            f"({h0['toxic']}/{h0['continuations']}) | 1.0× | ({p0:.2f}) | "
            f"{100 * h0['by_scorer'].get('hatesonar', h0)['toxic_rate']:.2f} | – |"]
    for n in doc.get("ranking", []) + [n for n in doc["variants"] if n not in doc.get("ranking", [])]:
        r = doc["variants"][n]
        if "select" not in r:
            continue
        st = r["select"]["toxicity"]["toxic_rate"]
        cells = [("**" + n + "**") if n == doc.get("pick") else n, str(r.get("sites", "")), f"{r['edge']:g}",
                 f"{100 * (r['ppl'][format(r['edge'], '.6g')] / pt0 - 1):+.1f} %", f"{100 * st:.2f}",
                 f"{s0 / st:.1f}×" if st else "∞"]
        h = r.get("heldout")
        if h:
            ht, hp = h["toxicity"], h["perplexity"]["perplexity"]
            b = r.get("baked", {})
            same = ("same count" if b.get("toxicity", {}).get("toxic") == ht["toxic"] else "count differs") if b else "–"
            cells += [f"{100 * ht['toxic_rate']:.2f} ({ht['toxic']}/{ht['continuations']})",
                      f"{h0['toxic_rate'] / ht['toxic_rate']:.1f}×" if ht["toxic_rate"] else "∞",
                      f"{100 * (hp / p0 - 1):+.1f} %",
                      f"{100 * ht['by_scorer'].get('hatesonar', ht)['toxic_rate']:.2f}", same]
        else:
            cells += ["–"] * 5
        rows.append("| " + " | ".join(cells) + " |")
    fs = doc.get("fitting_sets", {})
    return ("\n".join(rows) + f"\n\nFitting sets: {fs.get('toxic')} toxic + {fs.get('benign')} benign self-labelled "
            f"continuations of {fs.get('fit_prefixes')} fit prefixes. Edge λ: tuning-half perplexity at "
            f"+{100 * doc['ident']['select_budget']:g} %.\n")


def plot(doc: dict, path: Path) -> None:
    """Select toxic rate of each variant at its edge λ, and held-out toxicity vs perplexity for the reported ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = doc["original"]
    names = [n for n in doc.get("ranking", [])]
    if not names:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    vals = [100 * doc["variants"][n]["select"]["toxicity"]["toxic_rate"] for n in names]
    ax.barh(range(len(names)), vals, color=["C3" if n == doc.get("pick") else "C0" for n in names])
    ax.axvline(100 * o["select"]["toxicity"]["toxic_rate"], color="k", ls="--", lw=1, label="original")
    ax.axvline(100 * o["select"]["toxicity"]["toxic_rate"] / 4, color="gray", ls=":", lw=1, label="4× lower")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"toxic continuations, % (select prefixes), λ at +{100 * doc['ident']['select_budget']:g} % tuning PPL")
    ax.legend(fontsize=7)
    h0 = o["heldout"]
    p0 = h0["perplexity"]["perplexity"]
    bx.plot([0], [100 * h0["toxicity"]["toxic_rate"]], "*", ms=14, color="k", label="original")
    for i, n in enumerate(names):
        h = doc["variants"][n].get("heldout")
        if h:
            bx.plot([100 * (h["perplexity"]["perplexity"] / p0 - 1)], [100 * h["toxicity"]["toxic_rate"]], "o", ms=7,
                    color=f"C{i}", label=n)
    bx.axvline(100 * doc["ident"]["budget"], color="gray", ls="--", lw=1)
    bx.axhline(100 * h0["toxicity"]["toxic_rate"] / 4, color="gray", ls=":", lw=1)
    bx.set_xlabel("FLORES perplexity rise, % (held-out half)")
    bx.set_ylabel("toxic continuations, % (held-out prefixes)")
    bx.set_title(f"held out: {h0['toxicity']['continuations']} continuations per point; target: below and left of the grey lines",
                 fontsize=8)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
