"""DSAS: gated steering. Per site a logistic detector of source (unwanted) vs control (neutral)
activations decides per token how much of an inner map to apply: x + λσ(w·x + c)(T(x) − x).
With --joint the gates are trained with LinEAS maps, end to end."""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..maps import Map
from ..spec import Spec
from . import estimators
from .collect import collect
from .job import Job, check_finite

NOT_INNER = ("dsas", "lineas", "ablate")  # methods that cannot be fitted as the inner map here
GATE_FORMS = ("sigmoid", "units")


def validate(c, counts) -> None:
    """DSAS's own options (and, with --joint, LinEAS's); with `counts`, the text counts."""
    if c.joint:
        if not (c.lineas.retain if c.lineas else 1.0) >= 0:
            raise BakeError(f"--retain: must be a number ≥ 0, got {c.lineas.retain}")
        c.training().check(*((counts.source, counts.target) if counts else ()))
    if counts is not None and counts.control is None:
        raise BakeError("--control: DSAS needs a neutral control set (one text per line)")
    if counts is not None and counts.control < 4:
        raise BakeError("--control: DSAS needs a neutral control set of at least 4 texts")
    if c.gate_form not in GATE_FORMS:
        raise BakeError(f"--gate-form: {c.gate_form!r} is not one of {', '.join(GATE_FORMS)}")
    if c.joint:
        if c.gate_form != "sigmoid":
            raise BakeError("--gate-form units: not with --joint (the units gate is fitted from a detector and an inner vector)")
        return
    if counts is not None and counts.source < 4:
        raise BakeError("--source: DSAS needs at least 4 texts")
    if not 0.5 <= c.min_accuracy <= 1:
        raise BakeError(f"--min-accuracy: must be between 0.5 and 1, got {c.min_accuracy}")
    if c.inner is None:
        raise BakeError("--inner: give the inner map, as a spec file or a method name (e.g. mean-act)")
    if not c.inner.endswith(".json") and c.inner in NOT_INNER:
        raise BakeError(f"--inner: {c.inner} cannot be the inner map here (fit it first and pass the spec)")


def fit_dsas(job: Job, meth=None) -> Spec:
    """Sites whose detector reaches less than `min_accuracy` on a held-out fifth are left out."""
    c, spec = job.config, job.spec
    inner_maps = _inner_maps(job)
    if c.gate_form == "units":
        return _fit_units(job, inner_maps)
    infos = [job.catalog[name] for name in inner_maps]
    pos = collect(job.model, job.tok, job.source, infos, job.batch_size, desc="source activations", pooling=job.pooling)
    neg = collect(job.model, job.tok, job.control, infos, job.batch_size, desc="control activations",
                  pooling=job.pooling)
    g = torch.Generator().manual_seed(c.seed)
    report = {}
    for info in infos:
        p, n = pos[info.name], neg[info.name]
        report[info.name] = _held_out_accuracy(p, n, g, c.pca)
        if report[info.name] < c.min_accuracy:
            continue
        w, b = estimators.logistic(p, n, pca=c.pca)  # refit on everything for the kept site
        gate = Map("gated", job.strength, {"w": w.float(), "c": b.reshape(1).float()}, inner=inner_maps[info.name])
        check_finite(gate.tensors, info.name)
        spec.sites.append((info.name, [gate]))
    return _kept(job, max(report.values()), {"detector_accuracy": report, "candidate_sites": len(infos)})


def _fit_units(job: Job, inner_maps: dict[str, Map]) -> Spec:
    """--gate-form units: the gates as MLP units (fit/dsas_units.py)."""
    from .dsas_units import K, fit_units

    c = job.config
    g = torch.Generator().manual_seed(c.seed)
    sites, report = fit_units(job, inner_maps, c.min_accuracy, lambda p, n: _held_out_accuracy(p, n, g, c.pca))
    for name, maps in sites:
        check_finite(maps[0].tensors, name)
    job.spec.sites.extend(sites)
    return _kept(job, max(r["detector_accuracy"] for r in report.values()),
                 {"gate_form": "units", "sharpness": K, "gates": report, "candidate_sites": len(report)})


def _kept(job: Job, best: float, params: dict) -> Spec:
    """The spec of the sites whose detector was kept, fingerprinted on them, with the fit's parameters
    (`best`: the best held-out accuracy, for the error when none was kept)."""
    from ..models import fingerprint

    c, spec = job.config, job.spec
    if not spec.sites:
        raise BakeError(f"fit dsas: no site's detector reached --min-accuracy {c.min_accuracy:g} on held-out texts "
                        f"(best {best:.2f}); more or cleaner data, or a lower threshold")
    spec.model = fingerprint(job.model, [job.catalog[n] for n, _ in spec.sites])  # the sites actually kept
    spec.params["sites"] = [n for n, _ in spec.sites]
    spec.params.update({"inner": c.inner, "min_accuracy": c.min_accuracy, "pca": c.pca, "seed": c.seed, **params,
                        "kept_sites": len(spec.sites)})
    spec.provenance["n_control"] = len(job.control)
    return spec


def _held_out_accuracy(p: torch.Tensor, n: torch.Tensor, g: torch.Generator, pca: int | None) -> float:
    """A detector fitted on four fifths of each side, scored on the held-out fifth."""
    ip, ineg = torch.randperm(len(p), generator=g), torch.randperm(len(n), generator=g)
    kp, kn = max(1, len(p) // 5), max(1, len(n) // 5)
    w, c = estimators.logistic(p[ip[kp:]], n[ineg[kn:]], pca=pca)
    acc = float(torch.cat([((p[ip[:kp]].double() @ w + c) > 0).double(),
                           ((n[ineg[:kn]].double() @ w + c) <= 0).double()]).mean())
    return round(acc, 4)


def _inner_maps(job: Job) -> dict[str, Map]:
    """Per site, the one map to gate: from the --inner spec file, or fitted here by the --inner method."""
    from ..algebra import merge_maps
    from ..spec import read as read_spec

    c = job.config
    if c.inner.endswith(".json"):
        inner_spec = read_spec(c.inner)
    else:
        from . import fit
        from .config import FitConfig

        inner_spec = fit(job.model, job.tok, job.source, job.target,
                         FitConfig(c.inner, job.sites, 1.0, causal=c.causal, batch_size=job.batch_size,
                                   pooling=job.pooling))
    out = {}
    for name, maps in inner_spec.sites:
        if name not in job.catalog:
            raise BakeError(f"--inner: site {name!r} is not a site of this model")
        merged = merge_maps(list(maps))
        if len(merged) != 1:
            raise BakeError(f"--inner: {name}: {len(merged)} maps that do not compose into one; gate one map per site")
        out[name] = _inner_map(merged[0], name)
    return out


def _inner_map(m: Map, site: str) -> Map:
    """The inner map T of a gate runs at strength 1: fold the inner spec's own λ into its tensors."""
    if m.kind in ("affine", "additive") and not m.has_support:
        lin = m.to_linear()
        return Map("affine", 1.0, {"a": lin.diag.float(), "b": lin.bias.float()})
    if m.strength == 1.0 and m.kind != "gated":
        return m
    raise BakeError(f"--inner: {site}: a {m.kind} map at λ = {m.strength:g} cannot be gated as is "
                    f"(refit it at strength 1)")


def fit_joint(job: Job, meth=None) -> Spec:
    """--joint: gates and per-unit affine maps trained together (LinEAS loss plus a retain term)."""
    from .lineas import train

    cfg = job.config.training(job.pooling, gated=True)
    tensors, summary = train(job.model, job.tok, job.source, job.target, job.infos, cfg, progress=job.progress,
                             control=job.control)
    for info, t in zip(job.infos, tensors):
        check_finite(t, info.name)
        inner_map = Map("affine", 1.0, {"a": t["a"], "b": t["b"]})
        gate = Map("gated", job.strength, {"w": t["w"], "c": t["c"]}, inner=inner_map)
        job.spec.sites.append((info.name, [gate]))
    job.spec.params.update({"joint": True, "steps": cfg.steps, "lr": cfg.lr, "optimizer": cfg.optimizer,
                            "batch_size": cfg.batch_size, "retain": cfg.retain, "seed": cfg.seed, "run": summary})
    job.spec.provenance["n_control"] = len(job.control)
    return job.spec


def run_dsas(job: Job, meth=None) -> Spec:
    """DSAS, gating a given or fitted inner map, or (--joint) trained end to end."""
    return fit_joint(job) if job.config.joint else fit_dsas(job)



def report(spec: Spec, c) -> list[str]:
    """What `bake fit` prints after a DSAS fit: the sites kept (or, --joint, the LinEAS run)."""
    if c.joint:
        from .lineas import report as lineas_report

        return lineas_report(spec, c)
    if c.gate_form == "units":
        return [f"dsas (units gate): {site}: detector on {r['detector_site']}, held-out accuracy "
                f"{r['detector_accuracy']:.2f}; u·z = {r['u_dot_z']['mean']:.4f} ± {r['u_dot_z']['std']:.4f} over the "
                f"fit tokens; |units gate − σ| = {r['gate_agreement']:.3f} on average"
                for site, r in spec.params["gates"].items()]
    acc = spec.params["detector_accuracy"]
    return [f"dsas: kept {spec.params['kept_sites']}/{spec.params['candidate_sites']} sites (held-out detector "
            f"accuracy ≥ {c.min_accuracy:g}; range {min(acc.values()):.2f}–{max(acc.values()):.2f})"]
