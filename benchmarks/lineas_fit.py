"""LinEAS fit time and memory on the embedded model: `--steps` (default 1000) at 32 + 32
self-labelled sentences, post-norms (60 sites), batch 8, on CPU unless --device says otherwise.
Peak memory is the process's maximum resident set size (model, activations and gradients).
Writes benchmarks/results/lineas_fit.json.

    python benchmarks/lineas_fit.py [--steps 1000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from bake.fit import fit, read_texts
from bake.fit.lineas import LineasConfig
from bake.models import load

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lineas_fit.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = ROOT / "examples" / "data"
    src = read_texts(data / "selflabel_toxic.txt", "src")[:32]
    tgt = read_texts(data / "selflabel_benign.txt", "tgt")[:32]
    loaded = load(a.model, device=a.device)
    before = rss_mb()
    t = time.perf_counter()
    spec = fit(loaded.model, loaded.tokenizer, src, tgt, "lineas", ["post-norms"],
               lineas=LineasConfig(steps=a.steps, batch_size=8, seed=0))
    secs = time.perf_counter() - t
    run = spec.params["run"]
    res = {"model": a.model, "device": a.device, "threads": a.threads, "torch": torch.__version__,
           "machine": platform.machine(), "steps": a.steps, "sites": run["sites"], "units": run["units"],
           "fit_seconds": round(secs, 1), "seconds_per_step": round(run["seconds"] / run["steps_run"], 3),
           "peak_rss_mb_model_loaded": round(before), "peak_rss_mb": round(rss_mb()),
           "loss_first": run["loss_first"], "loss_last": run["loss_last"]}
    if a.device.startswith("cuda"):
        res["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
