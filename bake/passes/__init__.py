"""Compiler passes: plan → plan, one job each, in a fixed order. Each reports what it did per site
(`plan.report`). Passes change the in-memory model; they never write files."""

from __future__ import annotations

from ..plan import Plan
from . import (arch_rewrite, canonicalize, fold_consumers, fold_producer, insert_modules, norm_shift,
               residual_additive)

PIPELINE = (canonicalize, fold_producer, fold_consumers, norm_shift, residual_additive, insert_modules,
            arch_rewrite)


def run(plan: Plan) -> Plan:
    for p in PIPELINE:
        p.run(plan)
    return plan
