"""The yardstick shared by verify (causal LMs) and verify_pipeline (diffusers pipelines) when the plain
float32 bar is too tight: a model is as exact as it can be when its error vs the exact answer is at
most `NOISE_FACTOR` times the hooked model's own rounding error.

Loader contract, one for both: `load_at(dtype)` returns a fresh, unmodified copy of the original
model at `dtype` (whatever a verify needs with it: `(model, tokenizer)` for a causal LM, the
`PipelineModel` for a pipeline); it is freed after one use.
"""

from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch

NOISE_FACTOR = 1.5
EXACT_REF = "hooked float64"

T = TypeVar("T")


def within_noise(err: float, own: float) -> bool:
    """Is `err` no worse than `NOISE_FACTOR` times the hooked model's own error `own`?"""
    return err <= NOISE_FACTOR * own


def fresh_run(load_at: Callable[[torch.dtype], object], dtype: torch.dtype, run: Callable[[object], T]) -> T:
    """`run` on a fresh copy of the original at `dtype`; the copy is freed before returning."""
    copy = load_at(dtype)
    try:
        return run(copy)
    finally:
        del copy
        gc.collect()


def float64_verdict(load_at: Callable[[torch.dtype], object], run_hooked: Callable[[object], T],
                    distance: Callable[[T, T], float], ref: T, got: T, unit: str,
                    cache: dict | None = None) -> dict:
    """Judge the baked output `got` against the hooked reference run at float64: `run_hooked(copy)`
    runs the spec with hooks on a fresh float64 copy (once; kept in `cache` under "exact" when given);
    `distance(exact, x)` is the error of `x` vs the exact answer. Passes when the baked model is as
    close to it as the hooked float32 reference `ref` is (within `NOISE_FACTOR`). The report keys end
    in `unit` (`max_abs`, `rel`)."""
    if cache is not None and "exact" in cache:
        exact = cache["exact"]
    else:
        exact = fresh_run(load_at, torch.float64, run_hooked)
        if cache is not None:
            cache["exact"] = exact
    own, baked = distance(exact, ref), distance(exact, got)
    return {"exact_ref": EXACT_REF, f"hooked_fp32_vs_fp64_{unit}": own, f"baked_vs_fp64_{unit}": baked,
            "passed": within_noise(baked, own)}
