"""Weight edits shared by the fold passes, done in float64 (a block at a time) and cast back to the
parameter dtype; for a bfloat16 / float16 output the large products run in float32 (`plan.fold_dtype`),
whose rounding is far below the output's own."""

from __future__ import annotations

import torch

from ..maps import LinearMap
from ..models.adapter import linear_dims, linear_weight
from ..plan import Plan


def _real(mod: torch.nn.Module, path: str) -> torch.nn.Module:
    """A module whose weights a fold may read (a streaming bake leaves the modules it did not read on the
    meta device: folding into one of those would silently write nothing)."""
    if mod.weight.is_meta:
        raise RuntimeError(f"internal: {path} was not read from the checkpoint before a fold into it")
    return mod


def can_bias(plan: Plan, linear_path: str) -> bool:
    """True if the Linear has a bias or the architecture can turn one on."""
    mod = plan.model.get_submodule(linear_path)
    return mod.bias is not None or plan.adapter.bias_group(linear_path) is not None


def _bias64(linear: torch.nn.Module) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear_dims(linear)[1], dtype=torch.float64)
    return linear.bias.detach().double()


def _writable(plan: Plan, linear: torch.nn.Module, path: str, name: str) -> None:
    """A tensor about to be written: one held lazily in its stored dtype becomes float32 first, so the
    result is rounded to the stored dtype once, at the end, as on the in-memory path."""
    t = getattr(linear, name)
    if path in plan.lazy and t is not None and t.dtype != torch.float32:
        setattr(linear, name, torch.nn.Parameter(t.detach().float(), requires_grad=False))


def _set(plan: Plan, linear: torch.nn.Module, path: str, weight: torch.Tensor | None, bias: torch.Tensor | None):
    with torch.no_grad():
        if weight is not None:
            _writable(plan, linear, path, "weight")
            linear_weight(linear).copy_(weight.to(linear.weight.dtype))
        if bias is not None:
            if linear.bias is None:
                if not bool((bias == 0).all()):
                    dt = torch.float32 if path in plan.lazy else linear.weight.dtype
                    linear.bias = torch.nn.Parameter(torch.zeros(linear_dims(linear)[1], dtype=dt,
                                                                 device=linear.weight.device))
                    plan.biased.add(path)
                else:
                    return
            _writable(plan, linear, path, "bias")
            linear.bias.copy_(bias.to(linear.bias.dtype))


BLOCK = 2048  # rows (or columns) per float64 block: memory stays O(block × width), not a float64 copy of W


def _blocks(n: int):
    for i in range(0, n, BLOCK):
        yield slice(i, min(i + BLOCK, n))


def _matvec(W: torch.Tensor, v: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """W v in the plan's fold dtype, a block of rows at a time; float64 result."""
    v = v.to(dt)
    return torch.cat([W[r].to(dt) @ v for r in _blocks(W.shape[0])]).double()


def fold_output(plan: Plan, path: str, m: LinearMap) -> None:
    """Linear followed by y ↦ M y + b:  W' = M W,  bias' = M bias + b."""
    lin = _real(plan.model.get_submodule(path), path)
    bias = m.apply_matrix(_bias64(lin)) + m.bias
    dt = plan.fold_dtype
    if not m.scale_is_identity:
        _writable(plan, lin, path, "weight")
        W = linear_weight(lin)
        with torch.no_grad():
            if m.is_diagonal:  # rows scale: a block of rows at a time
                for r in _blocks(W.shape[0]):
                    W[r] = (m.diag[r, None].to(dt) * W[r].to(dt)).to(W.dtype)
            else:  # rows mix: a block of columns at a time
                for c in _blocks(W.shape[1]):
                    W[:, c] = (m.mat.to(dt) @ W[:, c].to(dt)).to(W.dtype)
    _set(plan, lin, path, None, bias)


def fold_input(plan: Plan, path: str, m: LinearMap) -> None:
    """x ↦ M x + b followed by a Linear:  W' = W M,  bias' = bias + W b (with the original W)."""
    lin = _real(plan.model.get_submodule(path), path)
    W = linear_weight(lin)
    dt = plan.fold_dtype
    bias = None if m.shift_is_zero else _bias64(lin) + _matvec(W.detach(), m.bias, dt)
    if not m.scale_is_identity:
        _writable(plan, lin, path, "weight")
        W = linear_weight(lin)
        with torch.no_grad():
            for r in _blocks(W.shape[0]):  # columns scale or mix: a block of rows at a time
                Wr = W[r].to(dt)
                W[r] = (Wr * m.diag[None, :].to(dt) if m.is_diagonal else Wr @ m.mat.to(dt)).to(W.dtype)
    _set(plan, lin, path, None, bias)


def add_bias(plan: Plan, path: str, shift: torch.Tensor) -> None:
    lin = _real(plan.model.get_submodule(path), path)
    _set(plan, lin, path, None, _bias64(lin) + shift)


def describe(m: LinearMap) -> str:
    if not m.is_diagonal:
        return f"dense {m.units}×{m.units} map" + ("" if m.shift_is_zero else " + shift")
    scaled = int((m.diag != 1).sum())
    shifted = int((m.bias != 0).sum())
    return f"{scaled}/{m.units} units scaled, {shifted}/{m.units} shifted"
