"""Direction ablation: one direction of the residual stream projected out at every chosen write."""

from __future__ import annotations

from ..errors import BakeError
from ..maps import Map
from ..spec import Spec
from . import estimators
from .collect import collect
from .job import Job, check_finite

REFERENCES = ("zero", "target")  # where the removed component goes
DIRECTIONS = ("lda", "mean")  # which direction is removed


def fit_ablate(job: Job, meth=None) -> Spec:
    """One direction u of the residual stream after `direction_layer` (default: the middle layer),
    projected out at every chosen site. At every write into the residual stream (attn-out, mlp-out)
    the projection folds into the writer's weight and bias. Direction "lda" (default):
    u = unit(Σ⁻¹(μs − μt)) with Σ the diagonal within-class covariance; "mean": u = unit(μs − μt),
    the classic abliteration direction, which on SmolLM2-135M lies mostly along one outlier unit.

    reference "zero" removes the component: x − λu(u·x). Reference "target" (affine concept
    editing) moves it to the target texts' mean instead, x − λu(u·x − r) with r = u·μt of that
    write: a projection and an additive map, both folding, and target-like text keeps its mean."""
    c, spec, infos = job.config, job.spec, job.infos
    site = _direction_site(job)
    direction = c.direction or DIRECTIONS[0]
    writes = infos if c.reference == "target" else []  # the writes' target means come from the same pass
    kw = dict(pooling=job.pooling, progress=job.progress)
    s = collect(job.model, job.tok, job.source, [site], job.batch_size, desc="source activations", **kw)[site.name]
    t = collect(job.model, job.tok, job.target, [site] + writes, job.batch_size, desc="target activations", **kw)
    U = (estimators.lda_direction if direction == "lda" else estimators.mean_direction)(s, t[site.name])
    check_finite({"U": U}, site.name)
    for info in infos:
        maps = [Map("projection", job.strength, {"U": U})]
        if c.reference == "target":
            shift = estimators.reference_shift(t[info.name], U)
            check_finite(shift, info.name)
            maps.append(Map("additive", job.strength, shift))
        spec.sites.append((info.name, maps))
    spec.params["direction_site"] = site.name
    spec.params["reference"] = c.reference
    spec.params["direction"] = direction
    top = int(U[:, 0].abs().argmax())  # a direction that is mostly one unit is an outlier unit, not a concept
    spec.params["largest_unit"] = {"unit": top, "weight": round(float(U[top, 0].abs()), 4)}
    return spec


def _direction_site(job: Job):
    """The residual site whose activations give the direction; every chosen site must be as wide."""
    residual = [s for s in job.catalog.values() if s.role == "residual"]  # one per layer, in order
    layer = len(residual) // 2 if job.config.direction_layer is None else job.config.direction_layer
    if not 0 <= layer < len(residual):
        raise BakeError(f"--direction-layer: {layer} is not a layer index (0 … {len(residual) - 1})")
    site = residual[layer]
    for info in job.infos:
        if info.units != site.units:
            raise BakeError(f"--sites: {info.name} has {info.units} units, the residual stream has {site.units}; "
                            f"ablate applies to residual writes (attn-out, mlp-out)")
    return site


def validate(c, counts) -> None:
    """ablate's own options: the reference and the direction."""
    if c.reference not in REFERENCES:
        raise BakeError(f"--reference: unknown reference {c.reference!r} (known: {', '.join(REFERENCES)})")
    if (c.direction or DIRECTIONS[0]) not in DIRECTIONS:
        raise BakeError(f"--direction: unknown direction {c.direction!r} (known: {', '.join(DIRECTIONS)})")


def report(spec: Spec, c) -> list[str]:
    """What `bake fit` prints after an ablate fit: the direction, and a warning if it is one unit."""
    big = spec.params["largest_unit"]
    lines = [f"ablate: {spec.params['direction']} direction from {spec.params['direction_site']}; largest unit "
             f"weight {big['weight']:.2f} (unit {big['unit']})"]
    if big["weight"] > 0.5:
        lines.append(f"ablate: warning: the direction is mostly unit {big['unit']} (an outlier unit removes more "
                     f"than a concept{'; try --direction lda' if spec.params['direction'] == 'mean' else ''})")
    return lines
