"""Tensor stores: the passes read and write a model's tensors by name through this one small interface,
so the same passes bake a loaded model and a checkpoint on disk that is never loaded.

- `ModuleStore`: the parameters of a loaded `nn.Module` (a write replaces the parameter's values).
- `exporters.shards.CheckpointStore`: a (sharded) safetensors checkpoint; reads on demand (ahead of
  the passes with `prefetch`), keeps writes until `flush`, then spills them to small files.

Names are state-dict keys (`model.layers.0.mlp.down_proj.weight`). A tensor is read as stored (dtype
and layout); a fold writes it in `out_dtype(name)`, which is where the rounding to the output dtype
is decided: the loaded parameter's own dtype, or float32 for a checkpoint (rounded once to the stored
dtype when it is written to disk).
"""

from __future__ import annotations

import torch


class TensorStore:
    """Read and write tensors by name. `prefetch` / `flush` bracket one group of sites (no-ops here)."""

    def has(self, name: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rows(self, name: str, idx: list[int]) -> torch.Tensor:
        """Rows `idx` (first axis) of a tensor; 0-d and 1-d tensors are read whole by the callers."""
        return self.get(name)[idx]

    def set(self, name: str, value: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def out_dtype(self, name: str) -> torch.dtype:  # pragma: no cover - interface
        raise NotImplementedError

    def prefetch(self, names: list[str]) -> None:
        """Start reading tensors the next group of sites will need."""

    def flush(self) -> None:
        """The current group of sites is done: settle its writes."""

    def finish(self) -> None:
        """Every pass has run: check what the store holds (NaN / Inf from an overflowing fold)."""

    def rebind(self, model: torch.nn.Module) -> None:
        """The model skeleton was replaced (a relabel to another class holding the same tensors)."""


def split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


class ModuleStore(TensorStore):
    """The parameters of a loaded model. Writes copy into the existing parameter (same shape and dtype:
    ties and views stay) or register a new one on its module (a bias a fold turned on)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.written: list[str] = []

    def _param(self, name: str):
        owner, attr = split(name)
        try:
            mod = self.model.get_submodule(owner) if owner else self.model
        except AttributeError:
            return None, None
        return mod, getattr(mod, attr, None)

    def has(self, name: str) -> bool:
        return self._param(name)[1] is not None

    def get(self, name: str) -> torch.Tensor:
        p = self._param(name)[1]
        if p is None:
            raise KeyError(name)
        return p.detach()

    def out_dtype(self, name: str) -> torch.dtype:
        p = self._param(name)[1]
        if p is None:
            p = self._param(split(name)[0] + ".weight")[1]
        return p.dtype if p is not None else torch.float32

    def set(self, name: str, value: torch.Tensor) -> None:
        mod, p = self._param(name)
        with torch.no_grad():
            if p is not None and p.shape == value.shape and p.dtype == value.dtype:
                p.copy_(value)
            else:
                like = getattr(mod, "weight", None)
                dev = like.device if like is not None else value.device
                setattr(mod, split(name)[1], torch.nn.Parameter(value.to(dev), requires_grad=False))
        self.written.append(name)

    def finish(self) -> None:
        check_finite(self.model.named_parameters(), "the folded weights")

    def rebind(self, model: torch.nn.Module) -> None:
        self.model = model


def check_finite(named_tensors, what: str, dtype: str | None = None) -> None:
    """Refuse (exit 2) when any tensor holds NaN or Inf: a strength or map tensor too large for the
    weights' precision overflows a fold (λ 1e308, v = 3e38, or a float16 output past 65504)."""
    from .errors import BakeError

    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            at = f" in {dtype}" if dtype else ""
            raise BakeError(f"--strength/spec: {what} of {name} are not finite (NaN or Inf){at}: the strength or a "
                            f"map tensor is too large for this model; nothing written")
