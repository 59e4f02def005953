"""What a gate folded as MLP units costs at run time: the original model, the units spec hooked, the
σ-gated spec hooked, and the stock checkpoint the units spec bakes into (every MLP wider by the padded
units), interleaved in one process (round-robin, rotating order): 64-token prefill and 32-token greedy
decode, medians and ratios, and the parameter counts. Writes benchmarks/results/units_cost_qwen.json.

    python benchmarks/units_cost.py [--model qwen] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "refuse.json"))
    ap.add_argument("--sigmoid", default=str(ROOT / "examples" / "refuse_sigmoid.json"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_cost_qwen.json"))
    a = ap.parse_args()
    from bake import compiler
    from bake.models import load
    from bake.runtime import steered
    from bake.spec import read

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        compiler.apply(a.model, [a.spec], Path(tmp) / "baked", log=lambda *_: None)
        apply_s = time.perf_counter() - t
        original, hooked, hooked_sigmoid = (load(a.model).model for _ in range(3))
        baked = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "baked"), dtype=torch.float32).eval()
        variants = {"original": original, "hooked units": hooked, "hooked sigmoid": hooked_sigmoid, "baked units": baked}
        ids = torch.randint(100, 20000, (1, 64), generator=torch.Generator().manual_seed(0))
        times = {v: {"prefill": [], "decode": []} for v in variants}
        with steered(hooked, [read(a.spec)]), steered(hooked_sigmoid, [read(a.sigmoid)]):
            for r in range(a.repeats + 1):  # the first round warms up
                names = list(variants)
                for v in names[r % len(names):] + names[:r % len(names)]:
                    p, d = run(variants[v], ids)
                    if r:
                        times[v]["prefill"].append(p)
                        times[v]["decode"].append(d)
        params = {v: sum(p.numel() for p in m.parameters()) for v, m in variants.items()}
    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    doc = {"model": a.model, "spec": Path(a.spec).name, "repeats": a.repeats, "threads": torch.get_num_threads(),
           "apply_with_verify_s": round(apply_s, 1), "intermediate_size": baked.config.intermediate_size,
           "parameters": params, "median_s": med,
           "over_original": {v: {k: med[v][k] / med["original"][k] for k in ("prefill", "decode")} for v in variants},
           "decode_ms_per_token": {v: 1000 * med[v]["decode"] / 32 for v in variants}}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


@torch.no_grad()
def run(model, ids: torch.Tensor) -> tuple[float, float]:
    """Seconds for a 64-token prefill and for 32 greedy tokens after a 16-token prompt."""
    t = time.perf_counter()
    model(ids)
    prefill = time.perf_counter() - t
    short = ids[:, :16]
    t = time.perf_counter()
    model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return prefill, time.perf_counter() - t


if __name__ == "__main__":
    main()
