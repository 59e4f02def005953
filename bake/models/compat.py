"""Names transformers changed within 5.x: the key/value cache of a causal LM's forward is the argument
and output field `cache` from 5.25 on (`past_key_values` before; the old name warns there and goes in
5.40). Both helpers take whichever this transformers has."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping


@functools.lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for `model(...)`: `cache` where the forward takes it, else `past_key_values`
    (read once per model class)."""
    return {_cache_name(type(model)): cache}


def cache_of(out):
    """The cache a forward returned (its `cache` field, or the older `past_key_values`); None from a
    runtime that returns logits only (llama.cpp, ONNX Runtime behind bake's wrappers)."""
    if isinstance(out, Mapping) and "cache" in out:
        return out["cache"]
    return getattr(out, "past_key_values", None)
