"""Weight edits shared by the fold passes, done in float64 and cast back to the parameter dtype."""

from __future__ import annotations

import torch

from ..maps import LinearMap
from ..models.adapter import linear_dims, linear_weight
from ..plan import Plan


def can_bias(plan: Plan, linear_path: str) -> bool:
    """True if the Linear has a bias or the architecture can turn one on."""
    mod = plan.model.get_submodule(linear_path)
    return mod.bias is not None or plan.adapter.bias_group(linear_path) is not None


def _bias64(linear: torch.nn.Module) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear_dims(linear)[1], dtype=torch.float64)
    return linear.bias.detach().double()


def _set(plan: Plan, linear: torch.nn.Module, path: str, weight: torch.Tensor | None, bias: torch.Tensor | None):
    with torch.no_grad():
        if weight is not None:
            linear_weight(linear).copy_(weight.to(linear.weight.dtype))
        if bias is not None:
            if linear.bias is None:
                if not bool((bias == 0).all()):
                    linear.bias = torch.nn.Parameter(torch.zeros(linear_dims(linear)[1], dtype=linear.weight.dtype,
                                                                 device=linear.weight.device))
                    plan.biased.add(path)
                else:
                    return
            linear.bias.copy_(bias.to(linear.bias.dtype))


def fold_output(plan: Plan, path: str, m: LinearMap) -> None:
    """Linear followed by y ↦ M y + b:  W' = M W,  bias' = M bias + b."""
    lin = plan.model.get_submodule(path)
    W = linear_weight(lin).detach().double()
    weight = None if m.scale_is_identity else (m.diag[:, None] * W if m.is_diagonal else m.mat @ W)
    bias = m.apply_matrix(_bias64(lin)) + m.bias
    _set(plan, lin, path, weight, bias)


def fold_input(plan: Plan, path: str, m: LinearMap) -> None:
    """x ↦ M x + b followed by a Linear:  W' = W M,  bias' = bias + W b."""
    lin = plan.model.get_submodule(path)
    W = linear_weight(lin).detach().double()
    weight = None if m.scale_is_identity else (W * m.diag[None, :] if m.is_diagonal else W @ m.mat)
    bias = None if m.shift_is_zero else _bias64(lin) + W @ m.bias
    _set(plan, lin, path, weight, bias)


def add_bias(plan: Plan, path: str, shift: torch.Tensor) -> None:
    lin = plan.model.get_submodule(path)
    _set(plan, lin, path, None, _bias64(lin) + shift)


def describe(m: LinearMap) -> str:
    if not m.is_diagonal:
        return f"dense {m.units}×{m.units} map" + ("" if m.shift_is_zero else " + shift")
    scaled = int((m.diag != 1).sum())
    shifted = int((m.bias != 0).sum())
    return f"{scaled}/{m.units} units scaled, {shifted}/{m.units} shifted"
