"""Direction ablation: one direction of the residual stream projected out at every chosen write."""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..maps import Map
from ..spec import Spec
from . import estimators
from .collect import collect
from .job import Job, check_finite

REFERENCES = ("zero", "target")  # where the removed component goes
DIRECTIONS = ("lda", "mean")  # which direction is removed
KERNEL_PARTS = ("attn", "mlp")  # --kernel components: the attn-out and mlp-out writes


def fit_ablate(job: Job, meth=None) -> Spec:
    """One direction u of the residual stream after `direction_layer` (default: the middle layer),
    projected out at every chosen site. At every write into the residual stream (attn-out, mlp-out)
    the projection folds into the writer's weight and bias. Direction "lda" (default):
    u = unit(Σ⁻¹(μs − μt)) with Σ the diagonal within-class covariance; "mean": u = unit(μs − μt),
    the classic abliteration direction, which on SmolLM2-135M lies mostly along one outlier unit.

    Abliteration's parameters (heretic's): a fractional `direction_layer` i + f interpolates,
    u = unit((1 − f)·u_i + f·u_(i+1)); `layer_directions` gives each write its own layer's direction;
    `kernel` sets each write's strength by its layer l, per component (attn, mlp):
    λ_l = λ·(max + (d / dist)·(min − max)) with d = |l − pos| ≤ dist, and no map beyond dist.

    reference "zero" removes the component: x − λu(u·x). Reference "target" (affine concept
    editing) moves it to the target texts' mean instead, x − λu(u·x − r) with r = u·μt of that
    write: a projection and an additive map, both folding, and target-like text keeps its mean.

    `rank` k > 1 removes a k-dimensional subspace instead (`estimators.refusal_subspace`: the mean
    direction and the top principal directions of the source offsets), P = I − λUUᵀ.
    `orthogonalize` removes from u its component along the target mean first (projected
    abliteration). `norm_preserving` keeps every output row of the writer at its norm (biprojected
    abliteration; see `norm_preserving_maps`): three maps per write, all folding exactly."""
    c, spec, infos = job.config, job.spec, job.infos
    residual = _residual_sites(job)
    layers = _direction_layers(job, residual)
    writes = infos if c.reference == "target" else []  # the writes' target means come from the same pass
    kw = dict(pooling=job.pooling, progress=job.progress)
    need = [residual[i] for i in layers]
    s = collect(job.model, job.tok, job.source, need, job.batch_size, desc="source activations", **kw)
    t = collect(job.model, job.tok, job.target, need + writes, job.batch_size, desc="target activations", **kw)
    estimate = estimators.lda_direction if (c.direction or DIRECTIONS[0]) == "lda" else estimators.mean_direction
    if c.rank > 1:
        estimate = lambda a, b: estimators.refusal_subspace(a, b, c.rank)  # noqa: E731
    dirs = {i: estimate(s[residual[i].name], t[residual[i].name]) for i in layers}
    if c.orthogonalize:
        dirs = {i: estimators.orthogonalized(d, t[residual[i].name]) for i, d in dirs.items()}
    for d in dirs.values():
        check_finite({"U": d}, "direction")
    lam = _strengths(job)
    for info in infos:
        layer = _layer_of(info)
        if lam.get(info.name, 0.0) == 0.0:
            continue
        U = dirs[layer] if c.layer_directions else interpolated(dirs, c.direction_layer, len(residual))
        maps = ([Map("projection", lam[info.name], {"U": U})] if not c.norm_preserving else
                norm_preserving_maps(writer_weight(job.model, info), U, lam[info.name]))
        if c.reference == "target":
            shift = estimators.reference_shift(t[info.name], U)
            check_finite(shift, info.name)
            maps.append(Map("additive", lam[info.name], shift))
        spec.sites.append((info.name, maps))
    if not spec.sites:
        raise BakeError(f"--kernel: {c.kernel!r} leaves no write steered (every chosen site is beyond its DIST)")
    _record(spec, c, residual, dirs, layers)
    return spec


def norm_preserving_maps(W: torch.Tensor, U: torch.Tensor, lam: float) -> list[Map]:
    """Biprojected abliteration of a writer y = Wx (+ b), exact. With r_i the norm of W's row i and
    P = I − λUUᵀ (U: the direction, or an orthonormal rank-k basis), the edit normalises the rows, projects, and restores each row's norm:
        W' = D₂ P D₁ W,  D₁ = diag(1/r),  D₂ = diag(r_i / ‖(P D₁ W)_i‖),
    so on the write it is three maps in order, affine(D₁) → projection(λ, u) → affine(D₂), each folding
    into W (and b, which they move too; heretic edits W alone and stores the change as a rank-3 LoRA,
    an approximation)."""
    W = W.detach().double()
    r = W.norm(dim=1).clamp_min(1e-12)
    u = U.double()
    W1 = W / r[:, None]
    W1 = W1 - lam * u @ (u.T @ W1)
    d2 = r / W1.norm(dim=1).clamp_min(1e-12)
    zero = torch.zeros_like(r).float()
    return [Map("affine", 1.0, {"a": (1 / r).float(), "b": zero}), Map("projection", lam, {"U": U}),
            Map("affine", 1.0, {"a": d2.float(), "b": zero})]


def writer_weight(model, info) -> torch.Tensor:
    """The weight [out, in] of the Linear whose output the site is (norm-preserving needs its rows)."""
    mod = model.get_submodule(info.module)
    if info.role != "linear" or info.side != "output" or getattr(mod, "weight", None) is None:
        raise BakeError(f"--norm-preserving: {info.name} is not one Linear's output (its rows are what is kept)")
    return mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.T  # Conv1D stores [in, out]


def _residual_sites(job: Job):
    """The residual sites (one per layer, in order); every chosen site must be as wide."""
    residual = [s for s in job.catalog.values() if s.role == "residual"]
    for info in job.infos:
        if info.units != residual[0].units:
            raise BakeError(f"--sites: {info.name} has {info.units} units, the residual stream has "
                            f"{residual[0].units}; ablate applies to residual writes (attn-out, mlp-out)")
    return residual


def _direction_layers(job: Job, residual) -> list[int]:
    """The layers whose residuals are needed: every write's own layer, or the one or two interpolated."""
    c, n = job.config, len(residual)
    if c.layer_directions:
        return sorted({_layer_of(i) for i in job.infos})
    at = n // 2 if c.direction_layer is None else c.direction_layer
    if not 0 <= at <= n - 1:
        raise BakeError(f"--direction-layer: {at:g} is not a layer index (0 … {n - 1}; a fraction interpolates)")
    lo = int(at)
    return [lo] if at == lo or lo == n - 1 else [lo, lo + 1]


def interpolated(dirs: dict, at: float | None, n: int):
    at = n // 2 if at is None else at
    lo = int(at)
    f = at - lo
    if f == 0 or lo + 1 not in dirs:
        return dirs[lo]
    u = (1 - f) * dirs[lo].double() + f * dirs[lo + 1].double()
    return (u / u.norm().clamp_min(1e-12)).float()


def _layer_of(info) -> int:
    """The decoder layer index in a site's module path (model.layers.N....)."""
    nums = [int(p) for p in info.module.split(".") if p.isdigit()]
    if not nums:
        raise BakeError(f"--sites: {info.name} is in no numbered layer (ablate steers decoder layers)")
    return nums[0]


def _strengths(job: Job) -> dict[str, float]:
    """λ per chosen site: the spec's strength, shaped by the kernel per component where one is given."""
    c = job.config
    kernel = parse_kernel(c.kernel) if c.kernel else {}
    comp = components(job.adapter, job.model)
    out = {}
    for info in job.infos:
        k = kernel.get(comp.get(info.name))
        out[info.name] = job.strength * (1.0 if k is None else kernel_weight(k, _layer_of(info)))
    return out


def components(adapter, model) -> dict[str, str]:
    """Site name → kernel component (attn, mlp): the family's attn-out and mlp-out writes (a family
    without one, e.g. parallel attention and MLP summed in one write, has no such component)."""
    return {n: k for k in KERNEL_PARTS if f"{k}-out" in adapter.presets for n in adapter.resolve(model, [f"{k}-out"])}


def parse_kernel(text: str) -> dict[str, tuple[float, float, float, float]]:
    """`attn=MAX,POS,MIN,DIST;mlp=…` → component → (max, pos, min, dist) (heretic's four parameters)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, vals = part.partition("=")
        try:
            nums = tuple(float(v) for v in vals.split(","))
        except ValueError:
            nums = ()
        if name.strip() not in KERNEL_PARTS or len(nums) != 4 or nums[3] < 0:
            raise BakeError(f"--kernel: {part!r}: expected attn=MAX,POS,MIN,DIST or mlp=… (DIST >= 0)")
        out[name.strip()] = nums
    return out


def kernel_weight(k: tuple[float, float, float, float], layer: int) -> float:
    """max at pos, linearly to min at distance dist, 0 beyond (heretic's abliteration weight)."""
    top, pos, low, dist = k
    d = abs(layer - pos)
    if d > dist:
        return 0.0
    return top if dist == 0 else top + (d / dist) * (low - top)


def _record(spec: Spec, c, residual, dirs: dict, layers: list[int]) -> None:
    spec.params["direction_site"] = ("each write's own layer" if c.layer_directions else
                                     " ↔ ".join(residual[i].name for i in layers))
    spec.params["reference"] = c.reference
    spec.params["direction"] = c.direction or DIRECTIONS[0]
    if c.direction_layer is not None and not c.layer_directions:
        spec.params["direction_layer"] = c.direction_layer
    if c.kernel:
        spec.params["kernel"] = c.kernel
    if c.orthogonalize:
        spec.params["orthogonalized"] = True
    if c.norm_preserving:
        spec.params["norm_preserving"] = True
    if c.rank > 1:
        spec.params["rank"] = c.rank
    U = next(iter(dirs.values()))
    top = int(U[:, 0].abs().argmax())  # a direction that is mostly one unit is an outlier unit, not a concept
    spec.params["largest_unit"] = {"unit": top, "weight": round(float(U[top, 0].abs()), 4)}


def validate(c, counts) -> None:
    """ablate's own options: the reference and the direction."""
    if c.reference not in REFERENCES:
        raise BakeError(f"--reference: unknown reference {c.reference!r} (known: {', '.join(REFERENCES)})")
    if (c.direction or DIRECTIONS[0]) not in DIRECTIONS:
        raise BakeError(f"--direction: unknown direction {c.direction!r} (known: {', '.join(DIRECTIONS)})")
    if c.kernel:
        parse_kernel(c.kernel)
    if c.rank < 1:
        raise BakeError(f"--rank: must be at least 1, got {c.rank}")
    if c.rank > 1 and (c.direction == "lda" or (c.direction_layer is not None and c.direction_layer % 1)):
        raise BakeError("--rank: a rank-k subspace starts from the mean direction (--direction mean) and is "
                        "taken at whole layers (a fractional --direction-layer interpolates one direction)")
    if c.layer_directions and c.direction_layer is not None:
        raise BakeError("--layer-directions: each write uses its own layer's direction; drop --direction-layer")


def report(spec: Spec, c) -> list[str]:
    """What `bake fit` prints after an ablate fit: the direction, and a warning if it is one unit."""
    big = spec.params["largest_unit"]
    lines = [f"ablate: {spec.params['direction']} direction from {spec.params['direction_site']}; largest unit "
             f"weight {big['weight']:.2f} (unit {big['unit']})"]
    if big["weight"] > 0.5:
        lines.append(f"ablate: warning: the direction is mostly unit {big['unit']} (an outlier unit removes more "
                     f"than a concept{'; try --direction lda' if spec.params['direction'] == 'mean' else ''})")
    return lines
