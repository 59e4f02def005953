"""Compiler passes: plan → plan, one job each, in a fixed order. Each reports what it did per site
(`plan.report`). Passes change the in-memory model; they never write files."""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..plan import Plan
from . import (arch_rewrite, canonicalize, fold_consumers, fold_producer, insert_modules, norm_shift,
               residual_additive)

PIPELINE = (canonicalize, fold_producer, fold_consumers, norm_shift, residual_additive, insert_modules,
            arch_rewrite)


def run(plan: Plan) -> Plan:
    for p in PIPELINE:
        p.run(plan)
    check_finite(plan.model.named_parameters(), "the folded weights")
    return plan


def check_finite(named_tensors, what: str, dtype: str | None = None) -> None:
    """Refuse (exit 2) when any tensor holds NaN or Inf: a strength or map tensor too large for the
    weights' precision overflows a fold (λ 1e308, v = 3e38, or a float16 output past 65504)."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            at = f" in {dtype}" if dtype else ""
            raise BakeError(f"--strength/spec: {what} of {name} are not finite (NaN or Inf){at}: the strength or a "
                            f"map tensor is too large for this model; nothing written")
