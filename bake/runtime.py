"""The hooked reference runtime: the meaning of a spec.

`with steered(model, specs): model(...)` applies every map of every site with forward hooks
(`:output`) and forward pre-hooks (`:input`) on the unmodified model, in spec order.
"""

from __future__ import annotations

import contextlib

import torch

from .maps import Map
from .plan import bind
from .spec import Spec


def _apply(maps: list[Map], x: torch.Tensor, unit_dim: int = -1) -> torch.Tensor:
    for m in maps:
        x = m(x, unit_dim)
    return x


def _output_hook(maps: list[Map], unit_dim: int = -1):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_apply(maps, output[0], unit_dim),) + tuple(output[1:])
        return _apply(maps, output, unit_dim)

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
                handles.append(mod.register_forward_hook(_output_hook(sp.maps, sp.info.unit_dim)))
            else:
                handles.append(mod.register_forward_pre_hook(_input_hook(sp.maps, sp.info.unit_dim), with_kwargs=True))
        yield plan
    finally:
        for h in handles:
            h.remove()
