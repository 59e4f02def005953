"""Per-unit estimators on pooled activations: source [N, d] and target [M, d] → map tensors."""

from __future__ import annotations

import torch

from ..errors import BakeError


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


def linear_act(src: torch.Tensor, tgt: torch.Tensor, min_std: float = 1e-4) -> dict[str, torch.Tensor]:
    """Least-squares line through matched sorted samples (1-D OT map, linear fit) per unit.

    A unit whose source samples barely spread, σs < min_std · max(1, |μs|) (the threshold
    Gaussian-AcT uses, relative to the unit's scale), gets no slope: a = 1 and b = μt − μs, the
    Mean-AcT shift. A slope fitted through nearly equal points is noise: with the old absolute 1e-6
    guard a SmolLM2 unit with σs ≈ 1e-5 got a ≈ 1e5 and mapped tokens at 0.21 and 0.25 to 966 and 4828."""
    n = min(src.shape[0], tgt.shape[0])
    s, t = quantiles(src, n), quantiles(tgt, n)
    ms, mt = s.mean(0), t.mean(0)
    var = ((s - ms) ** 2).mean(0)
    cov = ((s - ms) * (t - mt)).mean(0)
    ok = var.sqrt() >= min_std * ms.abs().clamp_min(1.0)
    a = torch.where(ok, cov / var.clamp_min(1e-300), torch.ones_like(var))
    b = mt - a * ms
    return {"a": a.float(), "b": b.float()}


def largest_slope(sites: list) -> dict | None:
    """The affine map with the largest |a| over (site, maps) pairs: where a spec amplifies most."""
    best = None
    for name, maps in sites:
        for m in maps:
            if m.kind == "affine":
                a = m.tensors["a"].abs()
                unit = int(a.argmax())
                if best is None or float(a[unit]) > best["a"]:
                    best = {"site": name, "unit": unit, "a": round(float(a[unit]), 4)}
    return best


def mean_act(src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shift source mean onto target mean: a = 1, b = μt − μs."""
    b = tgt.double().mean(0) - src.double().mean(0)
    return {"a": torch.ones_like(b).float(), "b": b.float()}


def source_range(src: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"lo": src.min(0).values.float(), "hi": src.max(0).values.float()}


def gaussian_act(src: torch.Tensor, tgt: torch.Tensor, min_std: float = 1e-4) -> dict[str, torch.Tensor]:
    """Match mean and standard deviation per unit: a = σt/σs, b = μt − a·μs; identity where σs < min_std."""
    s, t = src.double(), tgt.double()
    ss, st = s.std(0, unbiased=False), t.std(0, unbiased=False)
    ok = ss >= min_std
    a = torch.where(ok, st / ss.clamp_min(min_std), torch.ones_like(ss))
    b = torch.where(ok, t.mean(0) - a * s.mean(0), torch.zeros_like(ss))
    return {"a": a.float(), "b": b.float()}


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-unit AUROC of separating pos [N, d] (label 1) from neg [M, d]: P(pos > neg) + ½P(pos = neg)."""
    negs = torch.sort(neg.double().T.contiguous(), dim=1).values  # [d, M]
    p = pos.double().T.contiguous()  # [d, N]
    below = torch.searchsorted(negs, p, side="left").double()
    upto = torch.searchsorted(negs, p, side="right").double()
    return (below + 0.5 * (upto - below)).sum(1) / (pos.shape[0] * neg.shape[0])


def aura(src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """AurA: dampen units that detect the source: a = 1 − 2(AUROC − 0.5) where AUROC > 0.5, b = 0."""
    auc = auroc(src, tgt)
    a = torch.where(auc > 0.5, 1 - 2 * (auc - 0.5), torch.ones_like(auc))
    return {"a": a.float(), "b": torch.zeros_like(a).float()}


def caa(src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Contrastive activation addition: v = μt − μs."""
    return {"v": (tgt.double().mean(0) - src.double().mean(0)).float()}


def logistic(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, steps: int = 200,
             pca: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression, pos (1) vs neg (0), on standardised features (optionally
    their top `pca` principal components); returns (w, c) in raw activation coordinates, so that
    σ(w·x + c) is the probability of pos."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])]).double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sd
    P = None
    if pca is not None and pca < z.shape[1]:
        P = torch.linalg.svd(z, full_matrices=False).Vh[:pca].T  # [d, k]
        z = z @ P
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + c, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    wz = w.detach() if P is None else P @ w.detach()  # folded back into one vector
    w_raw = wz / sd
    return w_raw, c.detach() - w_raw @ mu


def logistic_normal(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> torch.Tensor:
    """Unit normal of an L2-regularised logistic regression separating pos (1) from neg (0)."""
    normal, _ = logistic(pos, neg, l2, steps)
    return normal / normal.norm().clamp_min(1e-12)


def iti_c(src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """ITI-c: along the unit normal n of a source-vs-target classifier, move by the projected
    mean gap: v = n · ⟨n, μt − μs⟩."""
    n = logistic_normal(src, tgt)
    gap = (tgt.double().mean(0) - src.double().mean(0)) @ n
    return {"v": (n * gap).float()}


def mean_direction(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The unit mean-difference direction (μs − μt)/‖μs − μt‖ as a [units, 1] matrix."""
    d = src.double().mean(0) - tgt.double().mean(0)
    return (d / d.norm().clamp_min(1e-12))[:, None].float()


def refusal_subspace(src: torch.Tensor, tgt: torch.Tensor, k: int) -> torch.Tensor:
    """A rank-k subspace [units, k], orthonormal: the mean-difference direction u₁ = unit(μs − μt), then
    the top k − 1 principal directions of the source texts' offsets from the target mean (xᵢ − μt), with
    u₁ projected out of them first: where the texts differ from the target in more than one way."""
    u = mean_direction(src, tgt).double()
    if k == 1:
        return u.float()
    off = src.double() - tgt.double().mean(0)
    off = off - (off @ u) @ u.T
    _, _, vh = torch.linalg.svd(off, full_matrices=False)
    if k - 1 > vh.shape[0]:
        raise BakeError(f"--rank: {k} exceeds the largest subspace these texts give ({1 + vh.shape[0]}: the mean "
                        f"direction and one principal direction per source text, at most the hidden size)")
    cols = torch.cat([u, vh[:k - 1].T], dim=1)
    basis, _ = torch.linalg.qr(cols)
    return (basis * torch.sign((basis * cols).sum(0))).float()  # QR may flip a column: keep u₁'s sign


def orthogonalized(u: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """u with its component along the target mean removed, u' = unit(u − (u·ĝ)ĝ), ĝ = μt/‖μt‖ (each
    column of a subspace, then orthonormalised)
    ("projected abliteration": only the part of the refusal direction that the harmless mean does not
    share is removed; heretic's `orthogonalize_direction`)."""
    g = tgt.double().mean(0)
    g = (g / g.norm().clamp_min(1e-12))[:, None]
    v = u.double() - g @ (g.T @ u.double())
    if v.shape[1] == 1:
        return (v / v.norm().clamp_min(1e-12)).float()
    q, _ = torch.linalg.qr(v)  # a rank-k subspace: orthonormal again
    return (q * torch.sign((q * v).sum(0))).float()


def lda_direction(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The discriminant direction Σ⁻¹(μs − μt), Σ the diagonal within-class covariance (per-unit
    variance of both sets about their own means), as a unit [units, 1] matrix. Where a few units
    carry most of the variance (the residual stream's outlier units), the plain mean difference
    points mostly along them; this one weighs every unit by how well it separates the sets."""
    s, t = src.double(), tgt.double()
    var = torch.cat([s - s.mean(0), t - t.mean(0)]).pow(2).mean(0)
    var = var.clamp_min(1e-12 * float(var.max()) + 1e-30)
    d = (s.mean(0) - t.mean(0)) / var
    return (d / d.norm().clamp_min(1e-30))[:, None].float()


def reference_shift(tgt: torch.Tensor, U: torch.Tensor) -> dict[str, torch.Tensor]:
    """The additive part of an affine projection toward the target mean: v = U(Uᵀμt), so that
    x − U(Uᵀx) + v = x − U(Uᵀ(x − μt)) (the component along U moves to the target's)."""
    Ud = U.double()
    return {"v": (Ud @ (Ud.T @ tgt.double().mean(0))).float()}


def monotone_pwl(src: torch.Tensor, tgt: torch.Tensor, knots: int = 16) -> dict[str, torch.Tensor]:
    """Full 1-D optimal transport per unit, as a piecewise-linear map through `knots` matched
    quantiles (source quantile → target quantile). Knots are nudged apart where the source ties."""
    xs = quantiles(src, knots).T.contiguous()  # [d, K]
    ys = quantiles(tgt, knots).T.contiguous()
    span = (xs[:, -1] - xs[:, 0]).abs() + 1
    eps = 1e-5 * span[:, None]
    for k in range(1, knots):  # strictly increasing knots
        xs[:, k] = torch.maximum(xs[:, k], xs[:, k - 1] + eps[:, 0])
    return {"xs": xs.float(), "ys": ys.float()}
