"""A DSAS gate around examples/detox.json (the LDA projection) vs the ungated projection, at
matched tuning perplexity: the gated λ is bisected to +7.5 % on the tuning half of FLORES (500
sentences, the edge detox.json's λ 1.39 was chosen at), then both are measured on the held-out
split (230 prefixes × 8 seeds, batch 80, and the other 500 FLORES sentences).

    python research/gate_vs_ungated.py [OUT_DIR]     # default /tmp/gate_vs_ungated; about 35 min on 2 CPU cores

Resumable: OUT_DIR/results.json is rewritten after every point.
"""
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data
sys.path.insert(0, str(HERE))
from bake.evaluation import EvalConfig, flores, rtp_prompts, write_json_atomic
from bake.evaluation.scorers import load_scorers
from bake.fit import fit, read_texts
from bake.models import load
from bake.spec import read, write
from detox_search import budget_edge  # noqa: E402
from method_table import timed_point  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gate_vs_ungated")
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
lda = read(EXAMPLES / "detox.json")
if not (OUT / "dsas.json").is_file():
    write(lda.with_strength(1.0), OUT / "lda1.json")
    src = read_texts(EXAMPLES / "data" / "detox_fit_toxic.txt", "s")
    ctrl = read_texts(EXAMPLES / "data" / "detox_fit_benign.txt", "c")[:600]
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
