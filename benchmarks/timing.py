"""Interleaved timing shared by the benchmarks: every function once per round, the order reversed
on alternate rounds (so drift and cache effects fall on all of them alike), medians in ms."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
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
