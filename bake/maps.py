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
| units          | x + λ·D(act(G z) ⊙ (U z)), z the MLP's input: extra units of a gated MLP |

Each kind is one `MapKind` subclass, registered by name in `MAP_KINDS` (`register_kind`): it owns
its tensor names, its checks, its torch semantics, its fold (foldable kinds only), why it does not
fold, its op in the inserted module (templates/modeling_bake.py) and a probe example. `Map` is the
data (kind name, λ, tensors, inner map) and delegates to its kind; `KINDS` and `FOLDABLE` are read
off the registry.

`LinearMap` is the canonical form of the kinds that fold into weights: y = M x + b, with M either
diagonal (a vector) or dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import BakeError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Tensors = dict[str, torch.Tensor]
OpConverter = Callable[..., tuple[dict, Tensors]]  # (segment, strength) → (op dict, tensors)


class MapKind:
    """One kind of map. Subclasses set the class attributes and override what their kind has;
    the base itself stands for an unknown name (it accepts nothing and folds nothing).

    need / optional: tensor names; unit_tensor: the one whose first axis is the unit count d;
    scalars: tensors that may be 0-d; takes_inner: whether the map wraps an inner map."""

    name = ""
    need: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    unit_tensor = ""
    scalars: tuple[str, ...] = ()
    foldable = False
    takes_inner = False
    why = ""  # why a map of this kind does not fold ("" if it does)

    def units(self, m: Map) -> int:
        """d = the unit tensor's first axis."""
        if not self.unit_tensor:
            raise KeyError(m.kind)
        return int(m.tensors[self.unit_tensor].shape[0])

    def has_support(self, m: Map) -> bool:
        return False

    def why_not_foldable(self, m: Map) -> str:
        return self.why

    def check(self, m: Map, where: str, d: int) -> None:
        """Kind-specific checks, after the generic ones (names, dtypes, finiteness) passed."""

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        """y = map(x), units last; t = the map's tensors in x's dtype and device."""
        raise AssertionError(m.kind)

    def to_linear(self, m: Map, t: Tensors) -> LinearMap:
        """The fold y = M x + b of a foldable map; t = its tensors in float64."""
        raise AssertionError(m.kind)

    def diagonal_step(self, m: Map) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def gate(self, m: Map, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{m.kind} map has no gate")

    needs_context = False  # apply reads more than x: the MLP's input and activation (`Context`)

    def apply_in(self, m: Map, x: torch.Tensor, t: Tensors, ctx: Context) -> torch.Tensor:
        """y = map(x) for a kind that reads the context (`needs_context`)."""
        raise AssertionError(m.kind)

    def to_op(self, m: Map, strength: float | None, convert: OpConverter) -> tuple[dict, Tensors]:
        """The inserted module's op dict (without "tensors") and its tensors; `convert` turns an
        inner segment into its own op (bake.modules._op)."""
        raise ValueError(m.kind)

    def example(self, units: int, gen: torch.Generator) -> Map:
        """A valid map of this kind with `units` units, drawn from gen (bake families' probes)."""
        raise NotImplementedError(self.name)


MAP_KINDS: dict[str, MapKind] = {}  # name → kind, in registration order
# tensors each kind needs, and the optional ones (read off MAP_KINDS)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
FOLDABLE: tuple[str, ...] = ()
_UNKNOWN = MapKind()


def register_kind(cls: type[MapKind]) -> type[MapKind]:
    """Class decorator: register one instance of cls under cls.name; KINDS and FOLDABLE follow."""
    global FOLDABLE
    if not cls.name or cls.name in MAP_KINDS:
        raise ValueError(f"map kind {cls.name!r} is unnamed or already registered")
    MAP_KINDS[cls.name] = cls()
    KINDS[cls.name] = (cls.need, cls.optional)
    FOLDABLE = tuple(n for n, k in MAP_KINDS.items() if k.foldable)
    return cls


@dataclass
class Context:
    """What a `units` map reads besides its site's tensor x: z, the input of the MLP whose output x is
    (what its gate and up projections read), and that MLP's own activation function."""

    z: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Map:
    """One map of a spec: its kind, strength λ and named tensors (and an inner map if gated)."""

    kind: str
    strength: float = 1.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    inner: Map | None = None

    @property
    def impl(self) -> MapKind:
        """The registered kind of this map (a placeholder that accepts nothing if unknown)."""
        return MAP_KINDS.get(self.kind, _UNKNOWN)

    @property
    def units(self) -> int:
        return self.impl.units(self)

    @property
    def has_support(self) -> bool:
        return self.impl.has_support(self)

    @property
    def foldable(self) -> bool:
        """Exactly foldable into linear weights (input-independent linear map)."""
        return self.impl.foldable and not self.has_support

    def why_not_foldable(self) -> str:
        return self.impl.why_not_foldable(self)

    def validate(self, where: str) -> None:
        """Check tensor presence, shapes, finiteness and kind-specific constraints."""
        kind = MAP_KINDS.get(self.kind)
        if kind is None:
            raise BakeError(f"{where}.kind: unknown map kind {self.kind!r} (known: {', '.join(MAP_KINDS)})")
        if (not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool)
                or not math.isfinite(float(self.strength))):
            raise BakeError(f"{where}.strength: must be a finite number, got {self.strength!r}")
        self._check_tensors(kind, where)
        kind.check(self, where, self.units)
        if not kind.takes_inner and self.inner is not None:
            raise BakeError(f"{where}.inner: only gated maps have an inner map")

    def _check_tensors(self, kind: MapKind, where: str) -> None:
        """Names (kind.need present, nothing beyond need + optional), float dtype, finite, a unit axis."""
        for name in kind.need:
            if name not in self.tensors:
                raise BakeError(f"{where}.tensors: missing tensor {name!r} for a {self.kind} map")
        extra = set(self.tensors) - set(kind.need) - set(kind.optional)
        if extra:
            raise BakeError(f"{where}.tensors: unexpected tensor(s) {sorted(extra)} for a {self.kind} map")
        for name, t in self.tensors.items():
            if t.dtype not in FLOATS:
                raise BakeError(f"{where}.tensors.{name}: must be float16, bfloat16, float32 or float64, got "
                                f"{str(t.dtype).replace('torch.', '')}")
            if not torch.isfinite(t).all():
                raise BakeError(f"{where}.tensors.{name}: contains NaN or Inf")
            if name not in kind.scalars and t.dim() == 0:
                raise BakeError(f"{where}.tensors.{name}: must have a unit axis, got a 0-d tensor (one number)")

    def with_strength(self, strength: float) -> Map:
        return Map(self.kind, float(strength), self.tensors, self.inner)

    # -- torch semantics ---------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, unit_dim: int = -1, ctx: Context | None = None) -> torch.Tensor:
        if unit_dim not in (-1, x.dim() - 1):
            return self(x.movedim(unit_dim, -1), ctx=ctx).movedim(-1, unit_dim)
        t = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self.tensors.items()}
        if self.impl.needs_context:
            if ctx is None:
                raise ValueError(f"a {self.kind} map reads the MLP's input: apply it with a Context")
            return self.impl.apply_in(self, x, t, ctx)
        return self.impl.apply(self, x, t)

    @property
    def needs_context(self) -> bool:
        return self.impl.needs_context

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """A gated map's opening σ(w·x + c) at every position of x (units last): shape x.shape[:-1]."""
        return self.impl.gate(self, x)

    def diagonal_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a gated map whose inner map T folds to a diagonal: the step T(x) − x = d⊙x + b as
        (d, b); None otherwise (see Gated.diagonal_step)."""
        return self.impl.diagonal_step(self)

    def to_linear(self) -> LinearMap:
        """Canonical form (a' = 1 + λ(a − 1), b' = λb) of a foldable map."""
        if not self.foldable:
            raise ValueError(f"{self.kind} map is not foldable")
        return self.impl.to_linear(self, {k: v.double() for k, v in self.tensors.items()})


def _strength(m: Map, strength: float | None) -> float:
    return m.strength if strength is None else strength


def _probe_ab(units: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The probes' first draws, a = 1 + 0.5·u₁ and b = 0.1 + u₂ (u uniform on [0, 1)^d): every
    example draws them, so the generator's sequence does not depend on the kind."""
    return 1 + 0.5 * torch.rand(units, generator=gen), 0.1 + torch.rand(units, generator=gen)


@register_kind
class Affine(MapKind):
    """y = (1−λ)x + λ(a⊙x + b); with a support [lo, hi], that only where lo < x < hi, else x.
    Folds (without a support) to a' = 1 + λ(a − 1), b' = λb."""

    name, need, optional, unit_tensor, foldable = "affine", ("a", "b"), ("lo", "hi"), "a", True

    def has_support(self, m: Map) -> bool:
        return "lo" in m.tensors

    def why_not_foldable(self, m: Map) -> str:
        if self.has_support(m):
            return "an affine map with a support acts only inside [lo, hi], which depends on the input"
        return ""

    def check(self, m: Map, where: str, d: int) -> None:
        """a, b (and lo, hi) all [d]; lo and hi together, lo ≤ hi."""
        t = m.tensors
        if t["a"].dim() != 1:
            raise BakeError(f"{where}.tensors.a: must be 1-D [units], got shape {list(t['a'].shape)}")
        for n in t:
            if not (t[n].dim() == 1 and t[n].shape[0] == d):
                raise BakeError(f"{where}.tensors.{n}: shape {list(t[n].shape)} != [{d}]")
        if ("lo" in t) != ("hi" in t):
            raise BakeError(f"{where}.tensors: support needs both 'lo' and 'hi'")
        if "lo" in t and not (t["lo"] <= t["hi"]).all():
            raise BakeError(f"{where}.tensors.lo: support lower bound above upper bound")

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        lam = m.strength
        y = (1 - lam) * x + lam * (t["a"] * x + t["b"])
        if "lo" in t:
            y = torch.where((x > t["lo"]) & (x < t["hi"]), y, x)
        return y

    def to_linear(self, m: Map, t: Tensors) -> LinearMap:
        lam = m.strength
        return LinearMap(diag=1 + lam * (t["a"] - 1), bias=lam * t["b"])

    def to_op(self, m: Map, strength: float | None, convert: OpConverter) -> tuple[dict, Tensors]:
        """op `affine` (support-masked; a foldable affine map reaches the module as a LinearMap)."""
        t = {k: m.tensors[k] for k in ("a", "b", "lo", "hi")}
        return {"op": "affine", "strength": _strength(m, strength)}, t

    def example(self, units: int, gen: torch.Generator) -> Map:
        a, b = _probe_ab(units, gen)
        return Map(self.name, 1.0, {"a": a, "b": b})


@register_kind
class Additive(MapKind):
    """y = x + λv; folds to a' = 1, b' = λv."""

    name, need, unit_tensor, foldable = "additive", ("v",), "v", True

    def check(self, m: Map, where: str, d: int) -> None:
        v = m.tensors["v"]
        if v.dim() != 1:
            raise BakeError(f"{where}.tensors.v: must be 1-D [units], got shape {list(v.shape)}")

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        return x + m.strength * t["v"]

    def to_linear(self, m: Map, t: Tensors) -> LinearMap:
        return LinearMap(diag=torch.ones_like(t["v"]), bias=m.strength * t["v"])

    def example(self, units: int, gen: torch.Generator) -> Map:
        _, b = _probe_ab(units, gen)
        return Map(self.name, 1.0, {"v": b})


@register_kind
class Projection(MapKind):
    """y = x − λ·U(Uᵀx), U [d, r] orthonormal (UᵀU = I); folds to M = I − λUUᵀ, b = 0."""

    name, need, unit_tensor, foldable = "projection", ("U",), "U", True

    def check(self, m: Map, where: str, d: int) -> None:
        U = m.tensors["U"]
        if U.dim() != 2 or U.shape[1] < 1 or U.shape[1] > U.shape[0]:
            raise BakeError(f"{where}.tensors.U: must be [units, rank] with 1 ≤ rank ≤ units, got {list(U.shape)}")
        gram = U.double().T @ U.double()
        if (gram - torch.eye(U.shape[1], dtype=torch.float64)).abs().max() > 1e-4:
            raise BakeError(f"{where}.tensors.U: columns are not orthonormal (UᵀU ≠ I)")

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        U = t["U"]
        return x - m.strength * ((x @ U) @ U.T)

    def to_linear(self, m: Map, t: Tensors) -> LinearMap:
        U = t["U"]
        d = U.shape[0]
        return LinearMap(mat=torch.eye(d, dtype=torch.float64) - m.strength * (U @ U.T),
                         bias=torch.zeros(d, dtype=torch.float64))

    def example(self, units: int, gen: torch.Generator) -> Map:
        _probe_ab(units, gen)  # drawn and dropped: the same generator sequence as the other probes
        U, _ = torch.linalg.qr(torch.randn(units, 1, generator=gen))
        return Map(self.name, 1.0, {"U": U})


@register_kind
class MonotonePwl(MapKind):
    """y = (1−λ)x + λ·f(x), f per unit piecewise-linear through knots xs[u] → ys[u] ([d, K], K ≥ 2,
    xs strictly increasing, ys non-decreasing), extended linearly past both ends (see `pwl`)."""

    name, need, unit_tensor = "monotone-pwl", ("xs", "ys"), "xs"
    why = "a piecewise-linear map is not linear"

    def check(self, m: Map, where: str, d: int) -> None:
        xs, ys = m.tensors["xs"], m.tensors["ys"]
        if xs.dim() != 2 or xs.shape != ys.shape or xs.shape[1] < 2:
            raise BakeError(f"{where}.tensors.xs: xs and ys must both be [units, knots≥2], got {list(xs.shape)} "
                            f"and {list(ys.shape)}")
        if not (xs[:, 1:] > xs[:, :-1]).all():
            raise BakeError(f"{where}.tensors.xs: knots must increase strictly along each unit")
        if not (ys[:, 1:] >= ys[:, :-1]).all():
            raise BakeError(f"{where}.tensors.ys: values must not decrease (the map is monotone)")

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        lam = m.strength
        return (1 - lam) * x + lam * pwl(x, t["xs"], t["ys"])

    def to_op(self, m: Map, strength: float | None, convert: OpConverter) -> tuple[dict, Tensors]:
        """op `pwl`."""
        return {"op": "pwl", "strength": _strength(m, strength)}, {"xs": m.tensors["xs"], "ys": m.tensors["ys"]}

    def example(self, units: int, gen: torch.Generator) -> Map:
        """Four knots per unit: xs = cumsum(0.1 + u) − 1, ys = cumsum(u′) − 1 (u, u′ uniform)."""
        xs = torch.cumsum(0.1 + torch.rand(units, 4, generator=gen), 1) - 1
        ys = torch.cumsum(torch.rand(units, 4, generator=gen), 1) - 1
        return Map(self.name, 1.0, {"xs": xs, "ys": ys})


@register_kind
class Gated(MapKind):
    """y = x + λ·g(x)·(T(x) − x), g(x) = σ(w·x + c) one number per token, T = the inner map at λ = 1
    (any kind but gated, same units)."""

    name, need, unit_tensor, scalars, takes_inner = "gated", ("w", "c"), "w", ("c",), True
    why = "a gated map scales its step by g(x), which depends on the input"

    def check(self, m: Map, where: str, d: int) -> None:
        """w [d], c one number, an inner map of another kind and d units (validated itself)."""
        t = m.tensors
        if t["w"].dim() != 1:
            raise BakeError(f"{where}.tensors.w: must be 1-D [units], got shape {list(t['w'].shape)}")
        if t["c"].numel() != 1:
            raise BakeError(f"{where}.tensors.c: must hold one number, got shape {list(t['c'].shape)}")
        if m.inner is None:
            raise BakeError(f"{where}.inner: a gated map needs an inner map")
        if m.inner.kind == self.name:
            raise BakeError(f"{where}.inner.kind: a gated map cannot gate another gated map")
        m.inner.validate(f"{where}.inner")
        if m.inner.units != d:
            raise BakeError(f"{where}.inner: inner map has {m.inner.units} units, gate has {d}")

    def opening(self, m: Map, x: torch.Tensor) -> torch.Tensor:
        """g = σ(x·w + c), shape [..., 1] (one linear, as in the inserted module)."""
        w, c = (m.tensors[k].to(device=x.device, dtype=x.dtype) for k in ("w", "c"))
        return torch.sigmoid(torch.nn.functional.linear(x, w.unsqueeze(0), c.reshape(1)))

    def gate(self, m: Map, x: torch.Tensor) -> torch.Tensor:
        return self.opening(m, x).squeeze(-1)

    def apply(self, m: Map, x: torch.Tensor, t: Tensors) -> torch.Tensor:
        """x + λ·g·(d⊙x + b) by two fused multiply-adds when T folds to a diagonal (diagonal_step),
        else x + λ·g·(T(x) − x)."""
        lam = m.strength
        g = self.opening(m, x)
        step = self.diagonal_step(m)
        if step is not None:  # T(x) − x = d⊙x + b, in the inserted module's ops (see diagonal_step)
            d, b = (s.to(device=x.device, dtype=x.dtype) for s in step)
            return torch.addcmul(x, g, torch.addcmul(b, x, d), value=lam)
        return x + lam * g * (m.inner.with_strength(1.0)(x) - x)

    def diagonal_step(self, m: Map) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For an inner map T that folds to a diagonal (affine without support, additive): the step
        T(x) − x = d⊙x + b as (d, b), computed once in float64 (d = a' − 1, b = b' of T at λ = 1) and
        stored in float32. The reference and the inserted module (`gated_diag` in
        templates/modeling_bake.py) both apply x + λ·g·(d⊙x + b) with the same fused ops: a steered
        network amplifies float32 rounding ~100× (SmolLM2 with 60 gated Linear-AcT sites: 1.7e-4
        relative vs float64), so the same function rounded another way, (a x + b) − x, misses the 1e-5
        bar although both are equally exact."""
        if not m.inner.foldable:
            return None
        lin = m.inner.with_strength(1.0).to_linear()
        if not lin.is_diagonal:
            return None
        return (lin.diag - 1).float(), lin.bias.float()

    def to_op(self, m: Map, strength: float | None, convert: OpConverter) -> tuple[dict, Tensors]:
        """op `gated_diag` (w, c, d, b) when the step is diagonal, else op `gated` with the inner
        op (T folded to a LinearMap where it folds) at λ = 1. Both keep the map's own λ."""
        step = self.diagonal_step(m)
        t = {"w": m.tensors["w"].reshape(1, -1), "c": m.tensors["c"].reshape(1)}  # linear's weight row, bias
        if step is not None:
            d, b = step  # T(x) − x = d⊙x + b: the reference's own ops (diagonal_step)
            return {"op": "gated_diag", "strength": m.strength}, {**t, "d": d, "b": b}
        inner = m.inner.with_strength(1.0).to_linear() if m.inner.foldable else m.inner
        iop, it = convert(inner, 1.0)
        t.update({f"inner.{k}": v for k, v in it.items()})
        return {"op": "gated", "strength": m.strength, "inner": [iop]}, t

    def example(self, units: int, gen: torch.Generator) -> Map:
        """w = u/√d with u standard normal, c = 0, around the affine probe."""
        inner = MAP_KINDS["affine"].example(units, gen)
        w = torch.randn(units, generator=gen) / math.sqrt(units)
        return Map(self.name, 1.0, {"w": w, "c": torch.zeros(1)}, inner)


@register_kind
class Units(MapKind):
    """y = x + λ·D(act(G z) ⊙ (U z)) at the output x of a gated MLP (down(act(gate z) ⊙ up z)), z the
    MLP's input: k more units of that MLP, G and U [k, d_in] (gate and up rows), D [d, k] (down columns),
    act the MLP's own activation. It folds exactly by growing the MLP: gate' = [gate; G], up' = [up; U],
    down' = [down, λD] (intermediate_size + k in every layer, the other layers' new units zero), a
    stock checkpoint (pass grow-mlp). Fitted gates that must fold use it (`bake fit --method dsas
    --gate-form units`)."""

    name, need, unit_tensor, needs_context = "units", ("gate", "up", "down"), "down", True
    why = "extra MLP units act on the MLP's input through its activation; they fold by growing the MLP"

    def check(self, m: Map, where: str, d: int) -> None:
        """gate and up [k, d_in] alike, down [d, k]."""
        g, u, dn = (m.tensors[k] for k in ("gate", "up", "down"))
        if g.dim() != 2 or g.shape[0] < 1:
            raise BakeError(f"{where}.tensors.gate: must be [k, d_in] with k ≥ 1, got {list(g.shape)}")
        if u.shape != g.shape:
            raise BakeError(f"{where}.tensors.up: shape {list(u.shape)} != gate's {list(g.shape)}")
        if dn.dim() != 2 or dn.shape[1] != g.shape[0]:
            raise BakeError(f"{where}.tensors.down: must be [units, k] with k = {g.shape[0]}, got {list(dn.shape)}")

    def apply_in(self, m: Map, x: torch.Tensor, t: Tensors, ctx: Context) -> torch.Tensor:
        z = ctx.z.to(x.dtype)
        lin = torch.nn.functional.linear
        return x + m.strength * lin(ctx.act(lin(z, t["gate"])) * lin(z, t["up"]), t["down"])

    def example(self, units: int, gen: torch.Generator) -> Map:
        """Three units reading an input of `units` features (an MLP whose input is its output's width)."""
        g, u = (torch.randn(3, units, generator=gen) / math.sqrt(units) for _ in range(2))
        return Map(self.name, 1.0, {"gate": 4 * g, "up": 4 * u, "down": torch.randn(units, 3, generator=gen)})


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
