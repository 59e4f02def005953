"""The README's main job as a user runs it: `bake apply --model llama --spec examples/detox.json --out
steered/` (the model already converted and cached), `repeats` times in fresh processes; wall time, the
time apply reports, and verify's share, with medians. Writes benchmarks/results/main_job.json.

    python benchmarks/main_job.py [--repeats 5] [--spec examples/detox.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import trange

ROOT = Path(__file__).resolve().parents[1]
BEFORE_S = {"wall": 52.0, "verify": 43.0}  # issue 25, the same command before batched verify


def one_run(spec: str, out: Path) -> dict:
    """One `bake apply` in a fresh process: wall seconds and what it reports."""
    cmd = [sys.executable, "-m", "bake.cli", "apply", "--model", "llama", "--spec", spec, "--out", str(out), "--force"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    report = json.loads((out / "bake_report.json").read_text())["verification"]
    apply_s = float(re.search(r"wrote .* in ([0-9.]+) s", done.stdout).group(1))
    return {"wall_s": wall, "apply_s": apply_s, "verify_s": report["seconds"],
            "greedy_generated": report["greedy_generated"], "passed": report["passed"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--spec", default="examples/detox.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one_run(a.spec, Path(tmp) / "warm")  # converts and caches the model once, as the README's first run does
        runs = [one_run(a.spec, Path(tmp) / f"run{i}") for i in trange(a.repeats, desc="main job")]
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "apply_s", "verify_s")}
    result = {"command": f"bake apply --model llama --spec {a.spec} --out steered/", "runs": runs, "median": med,
              "before": BEFORE_S, "speedup_wall": BEFORE_S["wall"] / med["wall_s"],
              "speedup_verify": BEFORE_S["verify"] / med["verify_s"],
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": _threads()}}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"median of {a.repeats}: wall {med['wall_s']:.1f} s (before {BEFORE_S['wall']:.0f} s), apply "
          f"{med['apply_s']:.1f} s, verify {med['verify_s']:.1f} s (before {BEFORE_S['verify']:.0f} s); "
          f"prompts generated for real per run: {[r['greedy_generated'] for r in runs]}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
