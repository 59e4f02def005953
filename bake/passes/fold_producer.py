"""Pass 2: fold a site's map into the module that produces it.

Linear output: W' = M W, bias' = M bias + b. Norm output with a diagonal map: the scale goes into
the norm weight (g' = a⊙g, or (c + g') = a⊙(c + g) for norms scaling by c + g); a norm with a bias
takes the shift too (β' = a⊙β + b), otherwise the shift stays for the norm-shift pass. Sum output
(a mixture of experts, y = Σ_e g_e W_e h_e): M y = Σ_e g_e (M W_e) h_e, so M folds into every
producer whatever the router picks; a shift goes into every expert's bias only where the router's
weights sum to one per token (the probe checks; else it would be added once per chosen expert).
"""

from __future__ import annotations

import torch

from ..maps import LinearMap
from ..plan import Plan
from .weights import can_bias, describe, fold_output, fold_slot_output

NAME = "fold-into-producer"


def run(plan: Plan, sites=None) -> None:
    off = plan.adapter.norm_weight_offset
    for sp in plan.sites if sites is None else sites:
        if len(sp.pending) != 1 or not isinstance(sp.pending[0], LinearMap) or sp.info.side != "output":
            continue
        m = sp.pending[0]
        if sp.info.role == "linear":
            if m.shift_is_zero or can_bias(plan, sp.info.module):
                fold_output(plan, sp.info.module, m)
                sp.pending = []
                plan.note(NAME, sp.name, f"{describe(m)} → {sp.info.module}.weight/bias")
        elif sp.info.role == "sum" and (m.shift_is_zero or sp.info.shift_slots):
            for slot in sp.info.slots:
                fold_slot_output(plan, slot, m)
            sp.pending = []
            plan.note(NAME, sp.name, f"{describe(m)} → {len(sp.info.slots)} producer weight(s) of {sp.info.module}")
        elif sp.info.role == "norm" and m.is_diagonal and _norm_takes(plan, _with_weight(plan, sp.info.module), m):
            plan.note(NAME, sp.name, fold_norm(plan, sp, m, off))


def fold_norm(plan: Plan, sp, m: LinearMap, off: float) -> str:
    """g' = a⊙(off + g) − off, and β' = a⊙β + b for a norm with a bias (else the shift stays pending)."""
    path, store = sp.info.module, plan.store
    g = store.get(f"{path}.weight").double()
    store.set(f"{path}.weight", (m.diag * (off + g) - off).to(store.out_dtype(f"{path}.weight")))
    done = f"scale of {int((m.diag != 1).sum())}/{m.units} units → {path}.weight"
    if store.has(f"{path}.bias"):
        beta = store.get(f"{path}.bias").double()
        store.set(f"{path}.bias", (m.diag * beta + m.bias).to(store.out_dtype(f"{path}.bias")))
        sp.pending = []
        return done + " and .bias"
    sp.pending = [] if m.shift_is_zero else [LinearMap(bias=m.bias, diag=torch.ones_like(m.diag))]
    return done


def _norm_takes(plan: Plan, path: str, m: LinearMap) -> bool:
    """A norm with a weight takes a scale; one with a bias too takes the shift as well."""
    if not plan.store.has(f"{path}.weight"):
        return False
    return not m.scale_is_identity or plan.store.has(f"{path}.bias")


def _with_weight(plan: Plan, path: str) -> str:
    """The norm at `path`; one built without a weight because of a config flag (PixArt's
    norm_elementwise_affine) gets weight 1 and bias 0 here, and the architecture-rewrite pass turns the
    flag on for the component."""
    if not plan.store.has(f"{path}.weight"):
        flag = plan.adapter.norm_flag(plan.model, path)
        if flag is not None:
            comp, name, controlled = flag
            enable_affine(plan.model.get_submodule(path))
            plan.norm_flags[comp] = (name, controlled)
    return path


def enable_affine(norm: torch.nn.Module) -> None:
    n = norm.normalized_shape
    like = next(iter(norm.buffers()), None)
    dev = like.device if like is not None else None
    norm.weight = torch.nn.Parameter(torch.ones(n, device=dev))
    norm.bias = torch.nn.Parameter(torch.zeros(n, device=dev))
    norm.elementwise_affine = True
