"""Pass 4: push what remains at a norm output (its shift, or a dense map) into every consumer.

For each consumer Linear c: W_c' = W_c M, bias_c' = bias_c + W_c b. Exact because the consumers
are the only readers of the norm's output (the adapter lists them). A mixture of experts reads the
norm through its router and its experts' 3-D weights (slots): the same fold along each slot's unit
dimension; the experts read rows of the norm's output, and a per-token map commutes with picking rows.
"""

from __future__ import annotations

from ..maps import LinearMap
from ..plan import Plan
from .weights import can_bias, describe, fold_input, fold_slot_input, slot_takes_shift

NAME = "norm-shift-push-down"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        info = sp.info
        if (info.role != "norm" or not (info.consumers or info.slots) or len(sp.pending) != 1
                or not isinstance(sp.pending[0], LinearMap)):
            continue
        m = sp.pending[0]
        if any(plan.pending_at(c, "input") for c in info.consumers):
            continue  # an inserted module reads this norm's output before that consumer: the map stays here
        if not (m.shift_is_zero or (all(can_bias(plan, c) for c in info.consumers)
                                    and all(slot_takes_shift(plan, s) for s in info.slots))):
            continue
        for c in info.consumers:
            fold_input(plan, c, m)
        for s in info.slots:
            fold_slot_input(plan, s, m)
        sp.pending = []
        names = [c.rsplit('.', 1)[-1] for c in info.consumers] + [s.param.rsplit('.', 2)[-2] + "." +
                                                                  s.param.rsplit('.', 1)[-1] for s in info.slots]
        plan.note(NAME, sp.name, f"{describe(m)} → {', '.join(names)} weight/bias")
