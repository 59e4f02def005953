"""The families package: every model family bake knows, as data (one table each, `decoders.py`;
the diffusers pipeline family, `pipelines.py`), and the one registry that finds a model's family.
No family name or module path appears outside this package."""

from __future__ import annotations

import torch

from ..errors import BakeError
from .decoders import DECODERS
from .pipelines import DIFFUSERS
from .table import Adapter, BiasGroup, Norm, SiteInfo, Tiny, linear_dims, linear_weight

FAMILIES: tuple[Adapter, ...] = (*DECODERS, DIFFUSERS)

__all__ = ["FAMILIES", "Adapter", "BiasGroup", "Norm", "SiteInfo", "Tiny", "adapter_for", "by_name", "linear_dims",
           "linear_weight"]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The family of a loaded (or meta-device) model: its table, by the config's model_type, or else the
    table bake's probe derives from one forward pass of the model (`probe.derive`)."""
    for a in FAMILIES:
        if a.matches(model):
            return a
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", type(model).__name__)
    if hasattr(cfg, "num_hidden_layers") and hasattr(model, "get_input_embeddings"):
        from .probe import derive

        return derive(model)
    raise BakeError(f"--model: unsupported model family {mt!r} (supported: "
                    f"{', '.join(t for a in FAMILIES for t in a.model_types)}, and decoders bake's probe can read)")


def by_name(name: str) -> Adapter:
    known = {a.family: a for a in FAMILIES}
    if name not in known:
        raise BakeError(f"--family: unknown family {name!r} (known: {', '.join(known)})")
    return known[name]
