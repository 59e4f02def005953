"""Pass: `units` maps become more units of the MLP they sit on, so the output stays a stock checkpoint.

At the output x of a gated MLP, x = down(act(gate z) ⊙ up z), a site's pending maps are linear maps
L_i (y ↦ N_i y + b_i) and units maps x ↦ x + λ D h(z), h(z) = act(G z) ⊙ (U z). Composed in order,

    y = L(x) + Σ_j N_{>j} λ_j D_j h_j(z),    L = the linear maps composed, N_{>j} their scales after j,

so `take` (before the folds) leaves L pending (it folds into down_proj as any map there does) and
keeps the units with D'_j = N_{>j} λ_j D_j. `run` (after the folds) appends them to every layer's MLP:

    gate' = [gate; G],  up' = [up; U],  down' = [down_folded, D']   (zeros in layers without units:
    act(0)·0 = 0 for silu / gelu / relu, and a zero down column adds nothing whatever its unit reads)

and raises `intermediate_size` by the most units any layer gained, rounded up to a multiple of
gcd(width, 256) so the width keeps the divisibility GGUF's quantised blocks need (256 for k-quants). Any other map at a units site is refused: it
would have to act on the sum, which the grown MLP cannot split."""

from __future__ import annotations

import math

import torch

from ..errors import BakeError
from ..maps import LinearMap, Map
from ..plan import Plan

NAME = "grow-mlp"
ALIGN = 256  # GGUF k-quant block: the grown width keeps gcd(width, ALIGN) as a divisor


def take(plan: Plan, sites) -> None:
    """Move each units map out of its site's pending list into `plan.grown[layer]` (see the module)."""
    for sp in sites:
        if not any(isinstance(s, Map) and s.needs_context for s in sp.pending):
            continue
        other = [s for s in sp.pending if isinstance(s, Map) and not s.needs_context]
        if other:
            raise BakeError(f"{sp.name}: a {other[0].kind} map shares this site with a units map; only linear maps "
                            f"can (the grown MLP's output is one sum, a non-linear map cannot act on part of it)")
        gate, up, down, _ = plan.adapter.mlp_of(sp.info)
        linear, units = None, []
        for seg in reversed(sp.pending):  # last first: N accumulates the scales applied after each units map
            if isinstance(seg, LinearMap):
                linear = seg if linear is None else seg.then(linear)
            else:
                D = seg.strength * seg.tensors["down"].double()
                if linear is not None:
                    D = linear.dense() @ D
                units.append((seg.tensors["gate"], seg.tensors["up"], D))
        plan.grown.setdefault(plan.adapter.mlp_layer(sp.info), []).extend(reversed(units))
        sp.pending = [] if linear is None or linear.is_identity else [linear]
        k = sum(g.shape[0] for g, _, _ in units)
        plan.note(NAME, sp.name, f"{len(units)} units map(s): {k} unit(s) → {gate}, {up}, {down}")


def check(plan: Plan) -> None:
    """Before the folds: refuse maps the grown units would not see as the hooked reference does. In a layer
    that gains units, a map on the MLP's input that folds into gate / up (a shift or a dense map at the
    norm feeding them, any map at their inputs) would reach the old rows only; a map on the residual
    after the layer that scales folds into down_proj's old columns only."""
    layers = {plan.adapter.mlp_layer(sp.info) for sp in plan.sites
              if any(isinstance(s, Map) and s.needs_context for s in sp.pending)}
    for layer in layers:
        gate, up, down, _ = plan.adapter.mlp.parts(layer)
        for sp in plan.sites:
            info, why = sp.info, None
            if not sp.pending:
                continue
            if info.side == "input" and info.module in (gate, up):
                why = "a map at the MLP's input"
            elif info.role == "norm" and {gate, up} & set(info.consumers) and not all(
                    isinstance(s, LinearMap) and s.is_diagonal and s.shift_is_zero for s in sp.pending):
                why = "a shift or dense map at the norm that feeds the MLP"
            elif info.role == "residual" and info.writer == down and not all(
                    isinstance(s, LinearMap) and s.scale_is_identity for s in sp.pending):
                why = "a map that scales the residual the MLP writes"
            if why:
                raise BakeError(f"{sp.name}: {why} cannot be baked with the units maps at {down}:output (it would fold "
                                f"into the MLP's existing weights only, not the new units'); put it in a separate bake "
                                f"or use a per-unit scale without shift there")


def _check_after_folds(plan: Plan) -> None:
    """After the folds: whatever is still pending at a site of the MLP's width (gate / up outputs, down's
    input, in any layer) would become an inserted module of the old width, and a linear map left after
    units (its shift had no bias to go to) would apply its scale to the new columns a second time."""
    inner = set()
    for layer in plan.adapter.layer_paths(plan.model):
        gate, up, down, _ = plan.adapter.mlp.parts(layer)
        inner |= {(gate, "output"), (up, "output"), (down, "input")}
        if layer in plan.grown:
            inner.add((down, "output"))
    for sp in plan.sites:
        if sp.pending and (sp.info.module, sp.info.side) in inner:
            raise BakeError(f"{sp.name}: this map does not fold into weights, and units maps widen every MLP, so it "
                            f"cannot stay as an inserted module here either (a shift after units maps needs a bias on "
                            f"the down projection: a family whose MLP has none cannot take it)")


def run(plan: Plan) -> None:
    if not plan.grown:
        return
    _check_after_folds(plan)
    mlp, model = plan.adapter.mlp, plan.model
    width = getattr(model.config, mlp.size)
    k = max(sum(g.shape[0] for g, _, _ in us) for us in plan.grown.values())
    align = math.gcd(width, ALIGN)
    extra = math.ceil(k / align) * align
    for layer in plan.adapter.layer_paths(model):
        _grow(plan, layer, plan.grown.get(layer, []), extra)
        plan.store.flush()  # a streamed checkpoint holds one layer's grown MLP at a time
    setattr(model.config, mlp.size, width + extra)
    plan.config_changes[mlp.size] = width + extra
    plan.note(NAME, "config", f"{mlp.size} {width} → {width + extra} in every layer ({k} fitted unit(s), "
                              f"{extra - k} zero padding, {len(plan.grown)} layer(s) with units)")


def _grow(plan: Plan, layer: str, units: list, extra: int) -> None:
    """Append `extra` units to the MLP of `layer`: the given ones first, zeros after."""
    gate, up, down, _ = plan.adapter.mlp.parts(layer)
    store, d_in = plan.store, _width(plan, gate)
    G = torch.zeros(extra, d_in, dtype=torch.float64)
    U, D = torch.zeros_like(G), torch.zeros(_width(plan, down, rows=True), extra, dtype=torch.float64)
    at = 0
    for g, u, dn in units:
        n = g.shape[0]
        G[at:at + n], U[at:at + n], D[:, at:at + n] = g.double(), u.double(), dn
        at += n
    for path, new, dim in ((gate, G, 0), (up, U, 0), (down, D, 1)):
        name = f"{path}.weight"
        W = store.get(name)
        store.set(name, torch.cat([W.to(store.out_dtype(name)), new.to(W.device, store.out_dtype(name))], dim=dim))
        _resize(plan, path, dim, W.shape[dim] + extra)
    for path in (gate, up):
        if store.has(f"{path}.bias"):
            b = store.get(f"{path}.bias")
            store.set(f"{path}.bias", torch.cat([b.to(store.out_dtype(f"{path}.bias")),
                                                 torch.zeros(extra, dtype=store.out_dtype(f"{path}.bias"), device=b.device)]))


def _width(plan: Plan, path: str, rows: bool = False) -> int:
    """A Linear's input width (or, with rows, its output width) from the skeleton."""
    w = plan.model.get_submodule(path).weight
    return w.shape[0 if rows else 1]


def _resize(plan: Plan, path: str, dim: int, n: int) -> None:
    """Keep the skeleton's Linear in step with its grown weight (its shape and features attributes)."""
    mod = plan.model.get_submodule(path)
    if dim == 0:
        mod.out_features = n
    else:
        mod.in_features = n
    if mod.weight.is_meta:
        shape = list(mod.weight.shape)
        shape[dim] = n
        mod.weight = torch.nn.Parameter(torch.empty(shape, device="meta", dtype=mod.weight.dtype), requires_grad=False)
        if dim == 0 and mod.bias is not None:
            mod.bias = torch.nn.Parameter(torch.empty(n, device="meta", dtype=mod.bias.dtype), requires_grad=False)
