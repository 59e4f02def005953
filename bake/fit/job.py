"""One fit in progress: the model, the texts, the options and the spec being filled in. Every
method's fitter (`Method.run`) takes a Job and returns the finished spec."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BakeError
from ..spec import Spec
from .config import FitConfig


@dataclass
class Job:
    """Everything a method's fitter needs; `_prepare` in `bake.fit` builds it after the checks."""
    model: object
    tok: object
    source: list[str]
    target: list[str]
    control: list[str] | None
    config: FitConfig
    sites: list[str]  # the site patterns: config.sites or the method's default sites
    spec: Spec  # method, params and provenance set; fitters append its sites
    adapter: object  # the model family's adapter
    catalog: dict  # every site of the model by name
    infos: list  # the chosen sites (SiteInfo), in graph order
    pooling: str  # the pooling collection uses (with KEEP_FIRST where the first token is pooled)
    pipeline: bool  # a diffusers pipeline
    progress: bool = True

    @property
    def strength(self) -> float:
        """λ stored in every map the fit writes."""
        return float(self.config.strength)

    @property
    def batch_size(self) -> int:
        """Texts per batch when collecting activations."""
        return self.config.texts_per_batch


def check_finite(tensors: dict[str, torch.Tensor], site: str) -> None:
    """A fitted tensor with NaN or Inf is bad input upstream: refuse it, naming the site."""
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise BakeError(f"fit: non-finite {k} at {site} (are the activations finite?)")
