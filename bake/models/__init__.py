"""Loading models (local directories, GGUF, hub ids, diffusers pipelines) and their fingerprint."""

from __future__ import annotations

import hashlib

import torch

from .loading import ALIASES, DEVICES, Loaded, load, pick_device, resolve

__all__ = ["ALIASES", "Loaded", "fingerprint", "load", "pick_device", "resolve", "DEVICES"]


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


DIGEST_ROWS = 8
DIGEST = f"rows{DIGEST_ROWS}-sha256:"


def sample_rows(n: int, k: int = DIGEST_ROWS) -> list[int]:
    """k evenly spaced indices in [0, n) (all of them when n ≤ k), both ends included."""
    return list(range(n)) if n <= k else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def weights_digest(model: torch.nn.Module, rows_of=None) -> str:
    """A cheap digest of the whole model: for every parameter, its name, shape and, in float32, the whole
    tensor if it is 1-D (norms, biases) or `DIGEST_ROWS` evenly spaced rows of it otherwise. A dense
    change anywhere (a LoRA merge, other random weights with the same default norms) changes it.
    `rows_of(name, idx)` reads rows from elsewhere (a checkpoint on disk, for a meta-device model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{list(p.shape)};".encode())
        idx = sample_rows(p.shape[0]) if p.dim() > 1 else None
        if rows_of is not None:
            t = rows_of(name, idx if idx is not None else list(range(p.shape[0]) if p.dim() else []))
        else:
            t = p.detach()[idx] if idx is not None else p.detach()
        h.update(t.to(torch.float32).cpu().contiguous().numpy().tobytes())
    return DIGEST + h.hexdigest()


def fingerprint(model: torch.nn.Module, sites: list, tensor_of=None, rows_of=None) -> dict:
    """Architecture, shapes, a hash of the weights at the given sites (in float32; kept for specs written
    before the digest) and `weights_digest` over the whole model, which is what binding checks.
    `tensor_of(name)` / `rows_of(name, idx)` read from elsewhere (a checkpoint on disk, for a model built
    on the meta device)."""
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
        "weights_digest": weights_digest(model, rows_of),
    }
