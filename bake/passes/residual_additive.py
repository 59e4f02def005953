"""Pass 5: an additive map on the residual stream after a layer goes into the bias of the layer's
last writer (the MLP's down projection): h + mlp(h) + λv = h + (mlp with bias + λv)(h)."""

from __future__ import annotations

from ..maps import LinearMap
from ..plan import Plan
from .weights import add_bias, can_bias

NAME = "residual-additive"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        if (sp.info.role != "residual" or len(sp.pending) != 1 or not isinstance(sp.pending[0], LinearMap)
                or not sp.pending[0].scale_is_identity or sp.info.writer is None
                or not can_bias(plan, sp.info.writer)):
            continue
        add_bias(plan, sp.info.writer, sp.pending[0].bias)
        sp.pending = []
        plan.note(NAME, sp.name, f"shift → {sp.info.writer}.bias")
