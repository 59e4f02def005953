"""Refusal induction side by side in one run: the original, the CAA refusal vector ungated
(`examples/refuse_caa.json`), the same vector behind its DSAS gate σ(w·h + c) (`examples/refuse_sigmoid.json`,
bakes with --insert-modules) and behind the same kind of detector written as two MLP units
(`examples/refuse.json`, folds into a stock checkpoint), on the held-out split, greedy and sampled over seeds. Writes benchmarks/results/refusal_induction_sampled_qwen.json.

    python benchmarks/refusal_induction.py [--n-prompts 30 --max-new-tokens 32 --seeds 0,1,2]

Sampled responses: temperature 0.7, top-p 0.8 (Qwen2.5-Instruct's generation settings), one set per
seed (`bake eval --task refusal --sampled`); rates pooled over the seeds, per seed kept too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "refusal_induction_sampled_qwen.json"
POINTS = (("original", None), ("ungated vector (refuse_caa.json)", "refuse_caa.json"),
          ("gated, sigmoid (refuse_sigmoid.json)", "refuse_sigmoid.json"),
          ("gated, MLP units (refuse.json)", "refuse.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    import torch

    from bake.evaluation import EvalConfig, refusal_sets, write_json_atomic
    from bake.evaluation.sweep import measure
    from bake.models import load
    from bake.runtime import steered
    from bake.spec import read

    harmful, benign, harmless = refusal_sets("heldout", a.n_prompts)
    cfg = EvalConfig(tasks=["refusal"], prompts=[], sentences=[], seeds=[int(s) for s in a.seeds.split(",")],
                     max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, refusal_harmful=harmful,
                     refusal_benign=benign, refusal_harmless=harmless, refusal_sampled=True)
    loaded = load(a.model)
    doc, base, out = {"settings": {"model": a.model, "prompts": a.n_prompts, "tokens": a.max_new_tokens,
                                   "seeds": cfg.seeds}, "points": {}}, {}, Path(a.out)
    for label, name in POINTS:
        spec = read(ROOT / "examples" / name) if name else None
        with steered(loaded.model, [spec]) if spec else torch.no_grad():
            r = measure(loaded.model, loaded.tokenizer, cfg, None, base)["refusal"]
        doc["points"][label] = {
            "kl": r["harmless_kl"],
            **{kind: {"greedy": r[kind]["refusals"], "sampled": r[kind]["sampled"]["refusals"],
                      "sampled_per_seed": r[kind]["sampled"]["refusals_per_seed"],
                      "sampled_responses": r[kind]["sampled"]["responses"]} for kind in ("harmful", "benign")}}
        write_json_atomic(out, doc)
        print(label, json.dumps(doc["points"][label]), flush=True)


if __name__ == "__main__":
    main()
