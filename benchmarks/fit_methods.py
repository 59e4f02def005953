"""Fit time per method on the embedded model, 200 + 200 sentences, each method's default sites.

Source: the 100 vendored toxic ToxiGen statements + the first 100 tuning RTP prefixes; target: the
100 benign statements + 100 FLORES sentences (timing does not depend on what the texts say).
Writes benchmarks/results/fit_methods.json.

    python benchmarks/fit_methods.py [--model llama]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bake.evaluation import flores, rtp_prompts
from bake.fit import METHODS, fit, read_texts
from bake.models import load

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fit_methods.json"))
    a = ap.parse_args()
    data = ROOT / "examples" / "data"
    source = read_texts(data / "toxigen_toxic.txt", "src") + rtp_prompts("tune")[:100]
    target = read_texts(data / "toxigen_benign.txt", "tgt") + flores(300)[200:300]
    loaded = load(a.model)
    res = {"model": a.model, "n_source": len(source), "n_target": len(target), "threads": torch.get_num_threads(),
           "methods": {}}
    for name, meth in METHODS.items():
        t = time.perf_counter()
        spec = fit(loaded.model, loaded.tokenizer, source, target, name)
        res["methods"][name] = {"seconds": time.perf_counter() - t, "sites": len(spec.sites),
                                "default_sites": meth.default_sites}
        print(name, res["methods"][name], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
