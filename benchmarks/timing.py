"""Interleaved timing shared by the benchmarks: every function once per round, the order reversed
on alternate rounds (so drift and cache effects fall on all of them alike), medians in ms.

`group` names each function's runtime (e.g. "pytorch", "ort"): functions of different runtimes
are timed in separate interleaved blocks, one after the other. ONNX Runtime's CPU threads spin for
a while after each run, so a PyTorch call timed right after an ORT call shares the cores with them:
mixed in one round, whichever PyTorch function follows an ORT one looked up to 1.3× slower."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                           group: Callable[[str], str] | None = None) -> dict[str, float]:
    if group is not None:
        blocks: dict[str, dict] = {}
        for k, f in fns.items():
            blocks.setdefault(group(k), {})[k] = f
        out: dict[str, float] = {}
        for block in blocks.values():
            out.update(interleaved_medians_ms(block, repeats, warmup))
        return {k: out[k] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def by_runtime(name: str) -> str:
    """The runtime a benchmark function's name says it runs on: "ort" / "onnx" in it, else PyTorch."""
    return "ort" if ("ort" in name.split("_") or "onnx" in name.split("_")) else "pytorch"
