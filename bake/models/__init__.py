"""Loading models and the family adapters that describe their graphs."""

from __future__ import annotations

import hashlib

import torch

from ..errors import BakeError
from .adapter import Adapter, SiteInfo
from .diffusion import PipelineAdapter
from .gemma import GemmaAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .qwen2 import MistralAdapter, Qwen2Adapter
from .loading import ALIASES, DEVICES, Loaded, load, pick_device, resolve

ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), Qwen2Adapter(), MistralAdapter(), GemmaAdapter(), GPT2Adapter(),
                                 PipelineAdapter())

__all__ = ["ADAPTERS", "ALIASES", "Adapter", "Loaded", "SiteInfo", "adapter_for", "fingerprint", "load", "pick_device", "resolve", "DEVICES"]


def adapter_for(model: torch.nn.Module) -> Adapter:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise BakeError(f"--model: unsupported model family {mt!r} (supported: "
                    f"{', '.join(t for a in ADAPTERS for t in a.model_types)})")


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def fingerprint(model: torch.nn.Module, sites: list[SiteInfo], tensor_of=None) -> dict:
    """Architecture, shapes and a hash of the weights at the given sites (in float32). `tensor_of(name)`
    reads an anchor from elsewhere (a checkpoint on disk, for a model built on the meta device)."""
    cfg = model.config
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for anchor in dict.fromkeys(s.anchor for s in sites):
        h.update(anchor.encode())
        t = tensor_of(anchor) if tensor_of is not None else params[anchor]
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "shapes": {k: getattr(cfg, k) for k in SHAPE_KEYS if hasattr(cfg, k)},
        "weights_sha256": h.hexdigest(),
    }
