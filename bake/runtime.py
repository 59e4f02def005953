"""The hooked reference runtime: the meaning of a spec.

`with steered(model, specs): model(...)` applies every map of every site with forward hooks
(`:output`) and forward pre-hooks (`:input`) on the unmodified model, in spec order. A `units` map at
an MLP's output also reads that MLP's input z: a pre-hook on the MLP's gate projection keeps z for it.
"""

from __future__ import annotations

import contextlib

import torch

from .maps import Context, Map
from .plan import bind
from .spec import Spec


def _apply(maps: list[Map], x: torch.Tensor, unit_dim: int = -1, ctx: Context | None = None) -> torch.Tensor:
    for m in maps:
        x = m(x, unit_dim, ctx)
    return x


def _output_hook(maps: list[Map], unit_dim: int = -1, box: dict | None = None):
    """box: where the pre-hook on the MLP's gate projection left this forward's Context (units maps)."""
    def hook(module, args, output):
        ctx = box.pop("ctx") if box is not None else None
        if isinstance(output, tuple):
            return (_apply(maps, output[0], unit_dim, ctx),) + tuple(output[1:])
        return _apply(maps, output, unit_dim, ctx)

    return hook


def _context_hook(box: dict, act):
    def hook(module, args, kwargs):
        box["ctx"] = Context(args[0] if args else next(iter(kwargs.values())), act)

    return hook


def _input_hook(maps: list[Map], unit_dim: int = -1):
    def hook(module, args, kwargs):
        if args:
            return (_apply(maps, args[0], unit_dim),) + tuple(args[1:]), kwargs
        key = next(iter(kwargs))  # e.g. hidden_states=...
        return args, {**kwargs, key: _apply(maps, kwargs[key], unit_dim)}

    return hook


@contextlib.contextmanager
def steered(model: torch.nn.Module, specs: Spec | list[Spec], check_model: bool = True):
    """Apply specs to `model` with hooks for the duration of the block."""
    plan = bind([specs] if isinstance(specs, Spec) else list(specs), model, check_model=check_model)
    handles = []
    try:
        for sp in plan.sites:
            mod = model.get_submodule(sp.info.module)
            if sp.info.side == "output":
                box = _context(model, plan, sp, handles) if any(m.needs_context for m in sp.maps) else None
                handles.append(mod.register_forward_hook(_output_hook(sp.maps, sp.info.unit_dim, box)))
            else:
                handles.append(mod.register_forward_pre_hook(_input_hook(sp.maps, sp.info.unit_dim), with_kwargs=True))
        yield plan
    finally:
        for h in handles:
            h.remove()


def _context(model: torch.nn.Module, plan, sp, handles: list) -> dict:
    """The box a units map's site reads its Context from, filled by a pre-hook on the MLP's gate."""
    gate, _, _, act = plan.adapter.mlp_of(sp.info)  # bind checked it is a gated MLP's output
    box: dict = {}
    handles.append(model.get_submodule(gate).register_forward_pre_hook(
        _context_hook(box, model.get_submodule(act)), with_kwargs=True))
    return box
