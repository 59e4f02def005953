"""Weight edits shared by the fold passes, done in float64 (a block at a time) and cast back to the
parameter dtype."""

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


BLOCK = 2048  # rows (or columns) per float64 block: memory stays O(block × width), not a float64 copy of W


def _blocks(n: int):
    for i in range(0, n, BLOCK):
        yield slice(i, min(i + BLOCK, n))


def _matvec64(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W v in float64, a block of rows at a time."""
    return torch.cat([W[r].double() @ v for r in _blocks(W.shape[0])])


def fold_output(plan: Plan, path: str, m: LinearMap) -> None:
    """Linear followed by y ↦ M y + b:  W' = M W,  bias' = M bias + b."""
    lin = plan.model.get_submodule(path)
    bias = m.apply_matrix(_bias64(lin)) + m.bias
    if not m.scale_is_identity:
        W = linear_weight(lin)
        with torch.no_grad():
            if m.is_diagonal:  # rows scale: a block of rows at a time
                for r in _blocks(W.shape[0]):
                    W[r] = (m.diag[r, None] * W[r].double()).to(W.dtype)
            else:  # rows mix: a block of columns at a time
                for c in _blocks(W.shape[1]):
                    W[:, c] = (m.mat @ W[:, c].double()).to(W.dtype)
    _set(plan, lin, path, None, bias)


def fold_input(plan: Plan, path: str, m: LinearMap) -> None:
    """x ↦ M x + b followed by a Linear:  W' = W M,  bias' = bias + W b (with the original W)."""
    lin = plan.model.get_submodule(path)
    W = linear_weight(lin)
    bias = None if m.shift_is_zero else _bias64(lin) + _matvec64(W.detach(), m.bias)
    if not m.scale_is_identity:
        with torch.no_grad():
            for r in _blocks(W.shape[0]):  # columns scale or mix: a block of rows at a time
                Wr = W[r].double()
                W[r] = (Wr * m.diag[None, :] if m.is_diagonal else Wr @ m.mat).to(W.dtype)
    _set(plan, lin, path, None, bias)


def add_bias(plan: Plan, path: str, shift: torch.Tensor) -> None:
    lin = plan.model.get_submodule(path)
    _set(plan, lin, path, None, _bias64(lin) + shift)


def describe(m: LinearMap) -> str:
    if not m.is_diagonal:
        return f"dense {m.units}×{m.units} map" + ("" if m.shift_is_zero else " + shift")
    scaled = int((m.diag != 1).sum())
    shifted = int((m.bias != 0).sum())
    return f"{scaled}/{m.units} units scaled, {shifted}/{m.units} shifted"
