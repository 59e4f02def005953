"""Pass 3: fold a map at a Linear's input into that Linear: W' = W M, bias' = bias + W b."""

from __future__ import annotations

from ..maps import LinearMap
from ..plan import Plan
from .weights import can_bias, describe, fold_input

NAME = "fold-into-consumers"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        if (sp.info.role != "linear" or sp.info.side != "input" or len(sp.pending) != 1
                or not isinstance(sp.pending[0], LinearMap)):
            continue
        m = sp.pending[0]
        if m.shift_is_zero or can_bias(plan, sp.info.module):
            fold_input(plan, sp.info.module, m)
            sp.pending = []
            plan.note(NAME, sp.name, f"{describe(m)} → {sp.info.module}.weight/bias")
