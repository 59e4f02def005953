"""Weight edits shared by the fold passes: the pure fold math (`fold_rows_*`, below) apart from naming,
and the by-name reads and writes through the plan's tensor store (`bake.store`).

Products run in `plan.fold_dtype` (float64; float32 when the output is bf16 / fp16, whose own rounding
is far above float32's), a block at a time, and are rounded once to the store's `out_dtype`."""

from __future__ import annotations

import torch

from ..maps import LinearMap
from ..families.table import Slot, linear_dims
from ..plan import Plan

BLOCK = 2048  # rows (or columns) per float64 block: memory stays O(block × width), not a float64 copy of W


def _blocks(n: int):
    for i in range(0, n, BLOCK):
        yield slice(i, min(i + BLOCK, n))


# -- pure fold math: W is [out, in]; results go into `out` (same shape), in out's dtype ------------------
def scale_rows(W: torch.Tensor, d: torch.Tensor, out: torch.Tensor, dt: torch.dtype) -> None:
    """out = diag(d) W: each output row r scaled by d[r]."""
    for r in _blocks(W.shape[0]):
        out[r] = (d[r, None].to(dt) * W[r].to(dt)).to(out.dtype)


def mix_rows(W: torch.Tensor, M: torch.Tensor, out: torch.Tensor, dt: torch.dtype) -> None:
    """out = M W (rows mixed), a block of columns at a time."""
    for c in _blocks(W.shape[1]):
        out[:, c] = (M.to(dt) @ W[:, c].to(dt)).to(out.dtype)


def right_multiply(W: torch.Tensor, m: LinearMap, out: torch.Tensor, dt: torch.dtype) -> None:
    """out = W M (columns scaled or mixed), a block of rows at a time."""
    for r in _blocks(W.shape[0]):
        Wr = W[r].to(dt)
        out[r] = (Wr * m.diag[None, :].to(dt) if m.is_diagonal else Wr @ m.mat.to(dt)).to(out.dtype)


def matvec(W: torch.Tensor, v: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """W v in `dt`, a block of rows at a time; float64 result."""
    v = v.to(dt)
    return torch.cat([W[r].to(dt) @ v for r in _blocks(W.shape[0])]).double()


# -- by name ---------------------------------------------------------------------------------------------
def is_transposed(plan: Plan, path: str) -> bool:
    """GPT-2 style Conv1D stores its weight [in, out]; nn.Linear [out, in]."""
    return not isinstance(plan.model.get_submodule(path), torch.nn.Linear)


def read_weight(plan: Plan, path: str) -> torch.Tensor:
    """The stored weight of a Linear at `path` as [out, in] (a transposed view for Conv1D)."""
    W = plan.store.get(f"{path}.weight")
    return W.t() if is_transposed(plan, path) else W


def write_weight(plan: Plan, path: str, fill) -> None:
    """`fill(W, out)` writes the new [out, in] weight into `out` (in the store's out dtype)."""
    name = f"{path}.weight"
    W, flip = plan.store.get(name), is_transposed(plan, path)
    stored = torch.empty(W.shape, dtype=plan.store.out_dtype(name))
    fill(W.t() if flip else W, stored.t() if flip else stored)
    plan.store.set(name, stored)


def can_bias(plan: Plan, linear_path: str) -> bool:
    """True if the Linear has a bias or the architecture can turn one on."""
    return plan.store.has(f"{linear_path}.bias") or plan.adapter.bias_group(linear_path) is not None


def bias64(plan: Plan, path: str) -> torch.Tensor:
    name = f"{path}.bias"
    if not plan.store.has(name):
        return torch.zeros(linear_dims(plan.model.get_submodule(path))[1], dtype=torch.float64)
    return plan.store.get(name).double()


def set_bias(plan: Plan, path: str, bias: torch.Tensor) -> None:
    """Write a Linear's bias; one it lacks is created (and recorded in `plan.biased`) unless all zero."""
    name = f"{path}.bias"
    if not plan.store.has(name):
        if bool((bias == 0).all()):
            return
        plan.biased.add(path)
    plan.store.set(name, bias.to(plan.store.out_dtype(name)))


def fold_output(plan: Plan, path: str, m: LinearMap) -> None:
    """Linear followed by y ↦ M y + b:  W' = M W,  bias' = M bias + b."""
    bias = m.apply_matrix(bias64(plan, path)) + m.bias
    dt = plan.fold_dtype
    if not m.scale_is_identity:
        if m.is_diagonal:  # rows scale: a block of rows at a time
            write_weight(plan, path, lambda W, out: scale_rows(W, m.diag, out, dt))
        else:  # rows mix: a block of columns at a time
            write_weight(plan, path, lambda W, out: mix_rows(W, m.mat, out, dt))
    set_bias(plan, path, bias)


def fold_input(plan: Plan, path: str, m: LinearMap) -> None:
    """x ↦ M x + b followed by a Linear:  W' = W M,  bias' = bias + W b (with the original W)."""
    dt = plan.fold_dtype
    bias = None if m.shift_is_zero else bias64(plan, path) + matvec(read_weight(plan, path), m.bias, dt)
    if not m.scale_is_identity:
        write_weight(plan, path, lambda W, out: right_multiply(W, m, out, dt))
    if bias is not None:
        set_bias(plan, path, bias)


def add_bias(plan: Plan, path: str, shift: torch.Tensor) -> None:
    set_bias(plan, path, bias64(plan, path) + shift)


# -- slots: weights that are no nn.Linear's (3-D expert tensors), by the dimension holding the units --------
def _as_reader(W: torch.Tensor, dim: int) -> torch.Tensor:
    """W as [rows, units] ([out, in] of a Linear reading the units)."""
    return W.movedim(dim, -1).reshape(-1, W.shape[dim])


def _as_producer(W: torch.Tensor, dim: int) -> torch.Tensor:
    """W as [units, cols] ([out, in] of a Linear writing the units)."""
    return W.movedim(dim, 0).reshape(W.shape[dim], -1)


def _write_slot(plan: Plan, slot: Slot, view, fill) -> None:
    """`fill(V, out)` writes the new 2-D view `view(W)` of the slot's weight; stored back in W's layout."""
    W = plan.store.get(slot.param)
    stored = torch.empty(W.shape, dtype=plan.store.out_dtype(slot.param))
    moved = stored.movedim(slot.dim, -1 if view is _as_reader else 0)  # a view of `stored`, contiguous or not
    out = torch.empty(view(W, slot.dim).shape, dtype=stored.dtype)
    fill(view(W, slot.dim), out)
    moved.copy_(out.reshape(moved.shape))
    plan.store.set(slot.param, stored)


def slot_takes_shift(plan: Plan, slot: Slot) -> bool:
    return slot.bias is not None and plan.store.has(slot.bias)


def fold_slot_input(plan: Plan, slot: Slot, m: LinearMap) -> None:
    """x ↦ M x + b before a reader: W' = W M along `dim`, bias' = bias + W b (the original W)."""
    dt = plan.fold_dtype
    if not m.shift_is_zero:
        b = plan.store.get(slot.bias)
        shift = matvec(_as_reader(plan.store.get(slot.param), slot.dim), m.bias, dt).reshape(b.shape)
        plan.store.set(slot.bias, (b.double() + shift).to(plan.store.out_dtype(slot.bias)))
    if not m.scale_is_identity:
        _write_slot(plan, slot, _as_reader, lambda W, out: right_multiply(W, m, out, dt))


def fold_slot_output(plan: Plan, slot: Slot, m: LinearMap) -> None:
    """A producer followed by y ↦ M y + b: W' = M W along `dim`, bias' = M bias + b (units on its last
    axis; b only where the site's shift_slots say it is added once)."""
    dt = plan.fold_dtype
    if m.scale_is_identity:
        if not m.shift_is_zero:
            add_slot_bias(plan, slot, m.bias)
        return
    if m.is_diagonal:
        _write_slot(plan, slot, _as_producer, lambda W, out: scale_rows(W, m.diag, out, dt))
    else:
        _write_slot(plan, slot, _as_producer, lambda W, out: mix_rows(W, m.mat, out, dt))
    if slot.bias and plan.store.has(slot.bias):
        b = plan.store.get(slot.bias)
        new = m.apply_matrix(b.double().reshape(-1, b.shape[-1]).t()).t() if not m.is_diagonal else b.double() * m.diag
        plan.store.set(slot.bias, (new.reshape(b.shape) + m.bias).to(plan.store.out_dtype(slot.bias)))


def add_slot_bias(plan: Plan, slot: Slot, shift: torch.Tensor) -> None:
    """A producer's bias (units on its last axis) + shift, for every expert."""
    b = plan.store.get(slot.bias)
    plan.store.set(slot.bias, (b.double() + shift).to(plan.store.out_dtype(slot.bias)))


def describe(m: LinearMap) -> str:
    if not m.is_diagonal:
        return f"dense {m.units}×{m.units} map" + ("" if m.shift_is_zero else " + shift")
    scaled = int((m.diag != 1).sum())
    shifted = int((m.bias != 0).sum())
    return f"{scaled}/{m.units} units scaled, {shifted}/{m.units} shifted"
