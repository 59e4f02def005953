"""Map algebra and its torch semantics.

A map acts on the unit axis of an activation (the last axis of a [batch, seq, units] tensor, or
`unit_dim` for other layouts) independently for every token. Kinds and meanings (λ = strength):

| kind           | y                                                                  |
|----------------|--------------------------------------------------------------------|
| affine         | (1−λ)x + λ(a⊙x + b); with support [lo, hi] only where lo < x < hi     |
| additive       | x + λv                                                             |
| projection     | x − λ·U(Uᵀx), U orthonormal [units, rank]                           |
| monotone-pwl   | (1−λ)x + λ·f(x), f per unit piecewise-linear through knots (xs, ys) |
| gated          | x + λ·g(x)·(T(x) − x), g(x) = σ(w·x + c), T the inner map at λ = 1  |

`LinearMap` is the canonical form of the kinds that fold into weights: y = M x + b, with M either
diagonal (a vector) or dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import BakeError

# tensors each kind needs, and the optional ones
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "affine": (("a", "b"), ("lo", "hi")),
    "additive": (("v",), ()),
    "projection": (("U",), ()),
    "monotone-pwl": (("xs", "ys"), ()),
    "gated": (("w", "c"), ()),
}
FOLDABLE = ("affine", "additive", "projection")


@dataclass
class Map:
    """One map of a spec: its kind, strength λ and named tensors (and an inner map if gated)."""

    kind: str
    strength: float = 1.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    inner: Map | None = None

    @property
    def units(self) -> int:
        t = self.tensors
        key = {"affine": "a", "additive": "v", "projection": "U", "monotone-pwl": "xs", "gated": "w"}[self.kind]
        return int(t[key].shape[0])

    @property
    def has_support(self) -> bool:
        return self.kind == "affine" and "lo" in self.tensors

    @property
    def foldable(self) -> bool:
        """Exactly foldable into linear weights (input-independent linear map)."""
        return self.kind in FOLDABLE and not self.has_support

    def why_not_foldable(self) -> str:
        if self.has_support:
            return "an affine map with a support acts only inside [lo, hi], which depends on the input"
        return {
            "monotone-pwl": "a piecewise-linear map is not linear",
            "gated": "a gated map scales its step by g(x), which depends on the input",
        }.get(self.kind, "")

    def validate(self, where: str) -> None:
        """Check tensor presence, shapes, finiteness and kind-specific constraints."""
        if self.kind not in KINDS:
            raise BakeError(f"{where}.kind: unknown map kind {self.kind!r} (known: {', '.join(KINDS)})")
        if (not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool)
                or not math.isfinite(float(self.strength))):
            raise BakeError(f"{where}.strength: must be a finite number, got {self.strength!r}")
        need, opt = KINDS[self.kind]
        for name in need:
            if name not in self.tensors:
                raise BakeError(f"{where}.tensors: missing tensor {name!r} for a {self.kind} map")
        extra = set(self.tensors) - set(need) - set(opt)
        if extra:
            raise BakeError(f"{where}.tensors: unexpected tensor(s) {sorted(extra)} for a {self.kind} map")
        for name, t in self.tensors.items():
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise BakeError(f"{where}.tensors.{name}: must be float16, bfloat16, float32 or float64, got "
                                f"{str(t.dtype).replace('torch.', '')}")
            if not torch.isfinite(t).all():
                raise BakeError(f"{where}.tensors.{name}: contains NaN or Inf")
            if name != "c" and t.dim() == 0:
                raise BakeError(f"{where}.tensors.{name}: must have a unit axis, got a 0-d tensor (one number)")
        t = self.tensors
        d = self.units
        vec = lambda n: t[n].dim() == 1 and t[n].shape[0] == d  # noqa: E731
        if self.kind == "affine":
            if t["a"].dim() != 1:
                raise BakeError(f"{where}.tensors.a: must be 1-D [units], got shape {list(t['a'].shape)}")
            for n in t:
                if not vec(n):
                    raise BakeError(f"{where}.tensors.{n}: shape {list(t[n].shape)} != [{d}]")
            if ("lo" in t) != ("hi" in t):
                raise BakeError(f"{where}.tensors: support needs both 'lo' and 'hi'")
            if "lo" in t and not (t["lo"] <= t["hi"]).all():
                raise BakeError(f"{where}.tensors.lo: support lower bound above upper bound")
        elif self.kind == "additive":
            if t["v"].dim() != 1:
                raise BakeError(f"{where}.tensors.v: must be 1-D [units], got shape {list(t['v'].shape)}")
        elif self.kind == "projection":
            U = t["U"]
            if U.dim() != 2 or U.shape[1] < 1 or U.shape[1] > U.shape[0]:
                raise BakeError(f"{where}.tensors.U: must be [units, rank] with 1 ≤ rank ≤ units, got {list(U.shape)}")
            gram = U.double().T @ U.double()
            if (gram - torch.eye(U.shape[1], dtype=torch.float64)).abs().max() > 1e-4:
                raise BakeError(f"{where}.tensors.U: columns are not orthonormal (UᵀU ≠ I)")
        elif self.kind == "monotone-pwl":
            xs, ys = t["xs"], t["ys"]
            if xs.dim() != 2 or xs.shape != ys.shape or xs.shape[1] < 2:
                raise BakeError(f"{where}.tensors.xs: xs and ys must both be [units, knots≥2], got {list(xs.shape)} and {list(ys.shape)}")
            if not (xs[:, 1:] > xs[:, :-1]).all():
                raise BakeError(f"{where}.tensors.xs: knots must increase strictly along each unit")
            if not (ys[:, 1:] >= ys[:, :-1]).all():
                raise BakeError(f"{where}.tensors.ys: values must not decrease (the map is monotone)")
        elif self.kind == "gated":
            if t["w"].dim() != 1:
                raise BakeError(f"{where}.tensors.w: must be 1-D [units], got shape {list(t['w'].shape)}")
            if t["c"].numel() != 1:
                raise BakeError(f"{where}.tensors.c: must hold one number, got shape {list(t['c'].shape)}")
            if self.inner is None:
                raise BakeError(f"{where}.inner: a gated map needs an inner map")
            if self.inner.kind == "gated":
                raise BakeError(f"{where}.inner.kind: a gated map cannot gate another gated map")
            self.inner.validate(f"{where}.inner")
            if self.inner.units != d:
                raise BakeError(f"{where}.inner: inner map has {self.inner.units} units, gate has {d}")
        if self.kind != "gated" and self.inner is not None:
            raise BakeError(f"{where}.inner: only gated maps have an inner map")

    def with_strength(self, strength: float) -> Map:
        return Map(self.kind, float(strength), self.tensors, self.inner)

    # -- torch semantics ---------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, unit_dim: int = -1) -> torch.Tensor:
        if unit_dim not in (-1, x.dim() - 1):
            return self(x.movedim(unit_dim, -1)).movedim(-1, unit_dim)
        lam = self.strength
        t = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self.tensors.items()}
        if self.kind == "affine":
            y = (1 - lam) * x + lam * (t["a"] * x + t["b"])
            if "lo" in t:
                y = torch.where((x > t["lo"]) & (x < t["hi"]), y, x)
            return y
        if self.kind == "additive":
            return x + lam * t["v"]
        if self.kind == "projection":
            U = t["U"]
            return x - lam * ((x @ U) @ U.T)
        if self.kind == "monotone-pwl":
            return (1 - lam) * x + lam * pwl(x, t["xs"], t["ys"])
        if self.kind == "gated":
            g = self._gate(x)
            step = self.diagonal_step()
            if step is not None:  # T(x) − x = d⊙x + b, in the inserted module's ops (see diagonal_step)
                d, b = (t.to(device=x.device, dtype=x.dtype) for t in step)
                return torch.addcmul(x, g, torch.addcmul(b, x, d), value=lam)
            return x + lam * g * (self.inner.with_strength(1.0)(x) - x)
        raise AssertionError(self.kind)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        w, c = (self.tensors[k].to(device=x.device, dtype=x.dtype) for k in ("w", "c"))
        return torch.sigmoid(torch.nn.functional.linear(x, w.unsqueeze(0), c.reshape(1)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """A gated map's opening σ(w·x + c) at every position of x (units last): shape x.shape[:-1]."""
        if self.kind != "gated":
            raise ValueError(f"{self.kind} map has no gate")
        return self._gate(x).squeeze(-1)

    def diagonal_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a gated map whose inner map T folds to a diagonal (affine without support, additive): the
        step T(x) − x = d⊙x + b as (d, b), computed once in float64 (d = a' − 1, b = b' of T at λ = 1)
        and stored in float32. The reference and the inserted module (`gated_diag` in
        templates/modeling_bake.py) both apply x + λ·g·(d⊙x + b) with the same fused ops: a steered
        network amplifies float32 rounding ~100× (SmolLM2 with 60 gated Linear-AcT sites: 1.7e-4
        relative vs float64), so the same function rounded another way, (a x + b) − x, misses the 1e-5
        bar although both are equally exact."""
        if self.kind != "gated" or not self.inner.foldable:
            return None
        lin = self.inner.with_strength(1.0).to_linear()
        if not lin.is_diagonal:
            return None
        return (lin.diag - 1).float(), lin.bias.float()

    def to_linear(self) -> LinearMap:
        """Canonical form (a' = 1 + λ(a − 1), b' = λb) of a foldable map."""
        if not self.foldable:
            raise ValueError(f"{self.kind} map is not foldable")
        lam = self.strength
        t = {k: v.double() for k, v in self.tensors.items()}
        if self.kind == "affine":
            return LinearMap(diag=1 + lam * (t["a"] - 1), bias=lam * t["b"])
        if self.kind == "additive":
            return LinearMap(diag=torch.ones_like(t["v"]), bias=lam * t["v"])
        U = t["U"]
        d = U.shape[0]
        return LinearMap(mat=torch.eye(d, dtype=torch.float64) - lam * (U @ U.T), bias=torch.zeros(d, dtype=torch.float64))


def pwl(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Per-unit piecewise-linear interpolation through knots, extended linearly past both ends.

    x: [..., d]; xs, ys: [d, K] with xs increasing along K.
    """
    d, K = xs.shape
    flat = x.reshape(-1, d).T.contiguous()  # [d, n]
    idx = torch.searchsorted(xs.contiguous(), flat).clamp(1, K - 1)  # segment right knot
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    y = y0 + (flat - x0) * (y1 - y0) / (x1 - x0)
    return y.T.reshape(x.shape)


@dataclass
class LinearMap:
    """y = M x + b in float64, M diagonal (`diag`) or dense (`mat`)."""

    bias: torch.Tensor
    diag: torch.Tensor | None = None
    mat: torch.Tensor | None = None

    @property
    def units(self) -> int:
        return int(self.bias.shape[0])

    @property
    def is_diagonal(self) -> bool:
        return self.mat is None

    def dense(self) -> torch.Tensor:
        return torch.diag(self.diag) if self.mat is None else self.mat

    def then(self, nxt: LinearMap) -> LinearMap:
        """Composition: apply self, then nxt."""
        bias = nxt.apply_matrix(self.bias) + nxt.bias
        if self.is_diagonal and nxt.is_diagonal:
            return LinearMap(bias=bias, diag=nxt.diag * self.diag)
        return LinearMap(bias=bias, mat=nxt.dense() @ self.dense())

    def apply_matrix(self, v: torch.Tensor) -> torch.Tensor:
        return self.diag * v if self.mat is None else self.mat @ v

    @property
    def scale_is_identity(self) -> bool:
        if self.mat is None:
            return bool((self.diag == 1).all())
        return bool((self.mat == torch.eye(self.units, dtype=self.mat.dtype)).all())

    @property
    def shift_is_zero(self) -> bool:
        return bool((self.bias == 0).all())

    @property
    def is_identity(self) -> bool:
        return self.scale_is_identity and self.shift_is_zero

    def identity_units(self) -> int:
        """Units left exactly unchanged (a' = 1 and b' = 0); dense maps count none."""
        if self.mat is not None:
            return 0
        return int(((self.diag == 1) & (self.bias == 0)).sum())
