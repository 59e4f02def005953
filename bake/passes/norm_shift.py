"""Pass 4: push what remains at a norm output (its shift, or a dense map) into every consumer.

For each consumer Linear c: W_c' = W_c M, bias_c' = bias_c + W_c b. Exact because the consumers
are the only readers of the norm's output (the adapter lists them).
"""

from __future__ import annotations

from ..maps import LinearMap
from ..plan import Plan
from .weights import can_bias, describe, fold_input

NAME = "norm-shift-push-down"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        if (sp.info.role != "norm" or not sp.info.consumers or len(sp.pending) != 1
                or not isinstance(sp.pending[0], LinearMap)):
            continue
        m = sp.pending[0]
        if not (m.shift_is_zero or all(can_bias(plan, c) for c in sp.info.consumers)):
            continue
        for c in sp.info.consumers:
            fold_input(plan, c, m)
        sp.pending = []
        plan.note(NAME, sp.name, f"{describe(m)} → {', '.join(c.rsplit('.', 1)[-1] for c in sp.info.consumers)} "
                                 f"weight/bias")
