"""Pass 5: an additive map on the residual stream after a layer goes into the bias of the layer's
last writer (the MLP's down projection): h + mlp(h) + λv = h + (mlp with bias + λv)(h). After a
mixture of experts whose router weights sum to one per token, into every expert's output bias:
Σ_e g_e (W_e h_e + b_e + v) = Σ_e g_e (W_e h_e + b_e) + v. Where the stream adds c times the
writer's output (MiniCPM: c = 1.4/√L), the bias takes v / c."""

from __future__ import annotations

from ..maps import LinearMap
from ..plan import Plan
from .weights import add_bias, add_slot_bias, can_bias

NAME = "residual-additive"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        info = sp.info
        if (info.role != "residual" or len(sp.pending) != 1 or not isinstance(sp.pending[0], LinearMap)
                or not sp.pending[0].scale_is_identity):
            continue
        writer_out = info.writer or next((o.info.module for o in plan.sites if o.info.role == "sum"
                                          and o.info.module.startswith(info.module + ".")), None)
        if writer_out and plan.pending_at(writer_out, "output"):
            continue  # the writer's output keeps an inserted module: the shift must come after it
        shift = sp.pending[0].bias if info.writer_scale == 1.0 else sp.pending[0].bias / info.writer_scale
        if info.writer is not None and can_bias(plan, info.writer):
            add_bias(plan, info.writer, shift)
            plan.note(NAME, sp.name, f"shift → {info.writer}.bias")
        elif info.shift_slots:
            for s in info.shift_slots:
                add_slot_bias(plan, s, shift)
            plan.note(NAME, sp.name, f"shift → every expert's output bias ({len(info.shift_slots)} slot(s))")
        else:
            continue
        sp.pending = []
