"""Per-unit estimators on pooled activations: source [N, d] and target [M, d] → map tensors."""

from __future__ import annotations

import torch


def quantiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """n evenly spaced quantiles per column of x [N, d] (linear interpolation), sorted ascending."""
    xs, _ = torch.sort(x.double(), dim=0)
    N = xs.shape[0]
    if N == n:
        return xs
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n * N - 0.5
    pos = pos.clamp(0, N - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=N - 1)
    w = (pos - lo)[:, None]
    return xs[lo] * (1 - w) + xs[hi] * w


def linear_act(src: torch.Tensor, tgt: torch.Tensor, min_std: float = 1e-6) -> dict[str, torch.Tensor]:
    """Least-squares line through matched sorted samples (1-D OT map, linear fit) per unit."""
    n = min(src.shape[0], tgt.shape[0])
    s, t = quantiles(src, n), quantiles(tgt, n)
    ms, mt = s.mean(0), t.mean(0)
    var = ((s - ms) ** 2).mean(0)
    cov = ((s - ms) * (t - mt)).mean(0)
    a = torch.where(var > min_std ** 2, cov / var.clamp_min(min_std ** 2), torch.ones_like(var))
    b = mt - a * ms
    return {"a": a.float(), "b": b.float()}


def mean_act(src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shift source mean onto target mean: a = 1, b = μt − μs."""
    b = tgt.double().mean(0) - src.double().mean(0)
    return {"a": torch.ones_like(b).float(), "b": b.float()}


def source_range(src: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"lo": src.min(0).values.float(), "hi": src.max(0).values.float()}
