"""fit: estimate a spec from source (unwanted) and target (wanted) text sets."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import BakeError
from ..maps import Map
from ..models import adapter_for, fingerprint
from ..runtime import steered
from ..spec import Spec, file_digest
from . import estimators
from .collect import KEEP_FIRST, POOLINGS, LayerReplay, collect, first_token

SUPPORTS = ("none", "source-range")
REFERENCES = ("zero", "target")  # ablate: where the removed component goes
DIRECTIONS = ("lda", "mean")  # ablate: which direction is removed


@dataclass(frozen=True)
class Method:
    kind: str  # the map kind it fits
    estimate: Callable[..., dict[str, torch.Tensor]]  # (source [N, d], target [M, d], options) → tensors
    pooling: str  # default pooling of token activations per text
    default_sites: str
    about: str


METHODS: dict[str, Method] = {
    "linear-act": Method("affine", lambda s, t, o: estimators.linear_act(s, t), "mean", "post-norms",
                         "per unit, least-squares line through matched sorted samples (AcT)"),
    "mean-act": Method("affine", lambda s, t, o: estimators.mean_act(s, t), "mean", "post-norms",
                       "per unit shift of the mean: a = 1, b = μt − μs"),
    "gaussian-act": Method("affine", lambda s, t, o: estimators.gaussian_act(s, t), "mean", "post-norms",
                           "per unit mean and std matching: a = σt/σs, b = μt − aμs"),
    "aura": Method("affine", lambda s, t, o: estimators.aura(s, t), "max", "mlp-in",
                   "dampen source-detecting units: a = 1 − 2(AUROC − ½) where AUROC > ½ (max-pooled)"),
    "caa": Method("additive", lambda s, t, o: estimators.caa(s, t), "mean", "residual",
                  "add the mean difference v = μt − μs"),
    "iti-c": Method("additive", lambda s, t, o: estimators.iti_c(s, t), "mean", "attn-out",
                    "add the classifier normal scaled by the projected mean gap"),
    "monotone-pwl": Method("monotone-pwl", lambda s, t, o: estimators.monotone_pwl(s, t, o["knots"]), "mean",
                           "post-norms", "per unit, full 1-D optimal transport through K matched quantiles"),
    "ablate": Method("projection", None, "mean", "attn-out,mlp-out",
                     "remove the mean-difference direction of the residual stream at every write"),
    "dsas": Method("gated", None, "mean", "post-norms",
                   "gate an inner map per token: σ(w·x + c) from a source-vs-control logistic detector per site"),
    "lineas": Method("affine", None, "mean", "post-norms",
                     "per-unit affine maps at all sites trained jointly (end-to-end W2), optional sparse group lasso"),
}


PIPELINE_METHODS = tuple(k for k, m in METHODS.items() if m.estimate is not None)


def read_texts(path: str | Path, field: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise BakeError(f"{field}: no such file {str(p)!r}")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise BakeError(f"{field}: {str(p)!r} is not UTF-8 text") from None
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        raise BakeError(f"{field}: {str(p)!r} needs at least 2 texts (one per line), has {len(lines)}")
    return lines


def fit(model, tok, source: list[str], target: list[str], method: str, sites: list[str] | None = None,
        strength: float = 1.0, support: str = "none", causal: bool = True, batch_size: int = 16,
        provenance: dict | None = None, pooling: str | None = None, knots: int = 16,
        direction_layer: int | None = None, reference: str = "zero", direction: str | None = None, lineas=None,
        progress: bool = True,
        control: list[str] | None = None,
        inner: str | Spec | None = None, min_accuracy: float = 0.75, pca: int | None = None, seed: int = 0,
        joint: bool = False) -> Spec:
    """Fit one map per site. Causal estimation collects the source activations of each site with the
    maps of all earlier sites active (graph order), so later maps see what they will really
    receive; target activations are collected once, unsteered."""
    if method not in METHODS:
        raise BakeError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
    meth = METHODS[method]
    if support not in SUPPORTS:
        raise BakeError(f"--support: unknown support {support!r} (known: {', '.join(SUPPORTS)})")
    if support != "none" and meth.kind != "affine":
        raise BakeError(f"--support: only affine methods take a support; {method} fits {meth.kind} maps")
    if reference not in REFERENCES:
        raise BakeError(f"--reference: unknown reference {reference!r} (known: {', '.join(REFERENCES)})")
    if reference != "zero" and method != "ablate":
        raise BakeError(f"--reference: only ablate takes a reference; {method} fits {meth.kind} maps")
    if direction is not None and method != "ablate":
        raise BakeError(f"--direction: only ablate takes a direction; {method} fits {meth.kind} maps")
    direction = direction or DIRECTIONS[0]
    if direction not in DIRECTIONS:
        raise BakeError(f"--direction: unknown direction {direction!r} (known: {', '.join(DIRECTIONS)})")
    pooling = pooling or meth.pooling
    if pooling.removesuffix(KEEP_FIRST) not in POOLINGS or pooling == "last" + KEEP_FIRST:
        raise BakeError(f"--pooling: unknown pooling {pooling!r} (known: {', '.join(POOLINGS)}; mean{KEEP_FIRST} "
                        f"and max{KEEP_FIRST} pool the first token too)")
    if method == "monotone-pwl" and not 2 <= knots <= min(len(source), len(target)):
        raise BakeError(f"--knots: {knots} quantiles need 2 ≤ knots ≤ the smaller text count "
                        f"({min(len(source), len(target))})")
    from ..models.diffusion import PipelineModel

    from .distributed import active as distributed

    pipeline = isinstance(model, PipelineModel)
    if distributed() and pipeline:
        raise BakeError("distributed fit: not available for diffusers pipelines yet (run it in one process)")
    if pipeline and (meth.estimate is None or support != "none"):
        raise BakeError(f"--method: {method}{' with --support' if support != 'none' else ''} is not available for "
                        f"diffusers pipelines yet (use {', '.join(PIPELINE_METHODS)})")
    sites = sites or (["norms"] if pipeline else meth.default_sites.split(","))
    adapter = adapter_for(model)
    catalog = adapter.sites(model)
    names = adapter.resolve(model, sites)
    infos = [catalog[n] for n in names]
    fp = fingerprint(model, infos)
    params = {"sites": sites, "support": support, "causal": causal, "pooling": pooling}
    if not pipeline and pooling in ("mean", "max"):  # leave the first token out only where it is a BOS or sink
        first = first_token(model, tok, list(source) + list(target))
        params["first_token"] = ("left out: " if first["drop"] else "pooled: ") + first["why"]
        pooling = pooling if first["drop"] else pooling + KEEP_FIRST
    if method == "monotone-pwl":
        params["knots"] = knots
    spec = Spec([], method=method, params=params, provenance=dict(provenance or {}), model=fp)
    spec.provenance.update({"bake_version": __version__, "created": datetime.date.today().isoformat(),
                            "n_source": len(source), "n_target": len(target)})
    if method == "dsas" and joint:
        from .lineas import LineasConfig, train

        if not control or len(control) < 4:
            raise BakeError("--control: DSAS needs a neutral control set of at least 4 texts")
        cfg = lineas or LineasConfig()
        cfg.pooling, cfg.gated = pooling, True
        tensors, summary = train(model, tok, source, target, infos, cfg, progress=progress, control=control)
        for info, t in zip(infos, tensors):
            _check_finite(t, info.name)
            inner_map = Map("affine", 1.0, {"a": t["a"], "b": t["b"]})
            spec.sites.append((info.name, [Map("gated", float(strength), {"w": t["w"], "c": t["c"]}, inner=inner_map)]))
        spec.params.update({"joint": True, "steps": cfg.steps, "lr": cfg.lr, "optimizer": cfg.optimizer,
                            "batch_size": cfg.batch_size, "retain": cfg.retain, "seed": cfg.seed,
                            "run": summary})
        spec.provenance["n_control"] = len(control)
        return spec
    if method == "dsas":
        return _fit_dsas(model, tok, source, target, control, inner, sites, strength, batch_size, spec, catalog,
                         min_accuracy, pca, seed, pooling, causal)
    if method == "lineas":
        from .lineas import LineasConfig, train

        cfg = lineas or LineasConfig(pooling=pooling)
        cfg.pooling = pooling
        tensors, summary = train(model, tok, source, target, infos, cfg, progress=progress)
        for info, t in zip(infos, tensors):
            _check_finite(t, info.name)
            spec.sites.append((info.name, [Map("affine", float(strength), t)]))
        spec.params.update({"steps": cfg.steps, "lr": cfg.lr, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size,
                            "accumulate": cfg.accumulate, "l1": cfg.l1, "group": cfg.group, "seed": cfg.seed, "max_minutes": cfg.max_minutes,
                            "loss": "mean over sites of the per-unit W2 sums (the LinEAS paper sums over sites: its "
                                    "l1/group weights = the number of sites × these)", "run": summary})
        return spec
    if method == "ablate":
        return _fit_ablate(model, tok, source, target, spec, infos, catalog, strength, batch_size, direction_layer,
                           reference, pooling, direction, progress)
    opts = {"knots": knots}
    if pipeline:
        from .diffusion import collect_pipeline

        spec.params.update({"denoise_steps": 1, "seed": seed, "pooling": "mean over pixels and tokens"})
        tgt = collect_pipeline(model, target, infos, seed=seed, batch_size=batch_size, desc="target activations",
                               progress=progress)
        src = collect_pipeline(model, source, infos, seed=seed, batch_size=batch_size, desc="source activations",
                               progress=progress)
        for info in infos:
            tensors = meth.estimate(src[info.name], tgt[info.name], opts)
            _check_finite(tensors, info.name)
            spec.sites.append((info.name, [Map(meth.kind, float(strength), tensors)]))
        return spec
    tgt = collect(model, tok, target, infos, batch_size, desc="target activations", pooling=pooling)
    if causal:
        replay = LayerReplay(model, tok, source, batch_size, adapter.layers_prefix())
    else:
        src = collect(model, tok, source, infos, batch_size, desc="source activations", pooling=pooling)
    for info in tqdm(infos, desc=f"fit {method}", unit="site", disable=not causal):
        if not causal:
            s = src[info.name]
        else:
            with steered(model, spec, check_model=False):
                layer = replay.layer_of(info.module)
                if layer is not None:  # run only this site's layer, from inputs with earlier maps on
                    replay.advance(layer)
                    s = replay.collect(info, pooling)
                else:  # a site outside the decoder layers: a full forward with earlier maps on
                    s = collect(model, tok, source, [info], batch_size, progress=False, pooling=pooling)[info.name]
        tensors = meth.estimate(s, tgt[info.name], opts)
        if support == "source-range":
            tensors.update(estimators.source_range(s))
        _check_finite(tensors, info.name)
        spec.sites.append((info.name, [Map(meth.kind, float(strength), tensors)]))
    if meth.kind == "affine":
        spec.params["largest_slope"] = estimators.largest_slope(spec.sites)
    return spec


def _check_finite(tensors: dict[str, torch.Tensor], site: str) -> None:
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise BakeError(f"fit: non-finite {k} at {site} (are the activations finite?)")


def _fit_ablate(model, tok, source, target, spec, infos, catalog, strength, batch_size, direction_layer,
                reference="zero", pooling="mean", direction="lda", progress=True) -> Spec:
    """One direction u of the residual stream after `direction_layer` (default: the middle layer),
    projected out at every chosen site. At every write into the residual stream (attn-out, mlp-out)
    the projection folds into the writer's weight and bias. Direction "lda" (default):
    u = unit(Σ⁻¹(μs − μt)) with Σ the diagonal within-class covariance; "mean": u = unit(μs − μt),
    the classic abliteration direction, which on SmolLM2-135M lies mostly along one outlier unit.

    reference "zero" removes the component: x − λu(u·x). Reference "target" (affine concept
    editing) moves it to the target texts' mean instead, x − λu(u·x − r) with r = u·μt of that
    write: a projection and an additive map, both folding, and target-like text keeps its mean."""
    residual = [s for s in catalog.values() if s.role == "residual"]  # one per layer, in order
    layer = len(residual) // 2 if direction_layer is None else direction_layer
    if not 0 <= layer < len(residual):
        raise BakeError(f"--direction-layer: {layer} is not a layer index (0 … {len(residual) - 1})")
    site = residual[layer]
    for info in infos:
        if info.units != site.units:
            raise BakeError(f"--sites: {info.name} has {info.units} units, the residual stream has {site.units}; "
                            f"ablate applies to residual writes (attn-out, mlp-out)")
    writes = infos if reference == "target" else []  # the writes' target means come from the same pass
    s = collect(model, tok, source, [site], batch_size, desc="source activations", pooling=pooling,
                progress=progress)[site.name]
    t = collect(model, tok, target, [site] + writes, batch_size, desc="target activations", pooling=pooling,
                progress=progress)
    U = (estimators.lda_direction if direction == "lda" else estimators.mean_direction)(s, t[site.name])
    _check_finite({"U": U}, site.name)
    for info in infos:
        maps = [Map("projection", float(strength), {"U": U})]
        if reference == "target":
            shift = estimators.reference_shift(t[info.name], U)
            _check_finite(shift, info.name)
            maps.append(Map("additive", float(strength), shift))
        spec.sites.append((info.name, maps))
    spec.params["direction_site"] = site.name
    spec.params["reference"] = reference
    spec.params["direction"] = direction
    top = int(U[:, 0].abs().argmax())  # a direction that is mostly one unit is an outlier unit, not a concept
    spec.params["largest_unit"] = {"unit": top, "weight": round(float(U[top, 0].abs()), 4)}
    return spec


def _inner_map(m: Map, site: str) -> Map:
    """The inner map T of a gate runs at strength 1: fold the inner spec's own λ into its tensors."""
    if m.kind in ("affine", "additive") and not m.has_support:
        lin = m.to_linear()
        return Map("affine", 1.0, {"a": lin.diag.float(), "b": lin.bias.float()})
    if m.strength == 1.0 and m.kind != "gated":
        return m
    raise BakeError(f"--inner: {site}: a {m.kind} map at λ = {m.strength:g} cannot be gated as is "
                    f"(refit it at strength 1)")


def _fit_dsas(model, tok, source, target, control, inner, sites, strength, batch_size, spec, catalog,
              min_accuracy, pca, seed, pooling, causal) -> Spec:
    """DSAS: per site, a logistic detector of source (unwanted) vs control (neutral) activations
    decides per token how much of the inner map to apply: x + λσ(w·x + c)(T(x) − x). Sites whose
    detector reaches less than `min_accuracy` on a held-out fifth are left out."""
    from ..algebra import merge_maps
    from ..spec import read as read_spec

    if not control or len(control) < 4:
        raise BakeError("--control: DSAS needs a neutral control set of at least 4 texts")
    if len(source) < 4:
        raise BakeError("--source: DSAS needs at least 4 texts")
    if not 0.5 <= min_accuracy <= 1:
        raise BakeError(f"--min-accuracy: must be between 0.5 and 1, got {min_accuracy}")
    if inner is None:
        raise BakeError("--inner: give the inner map, as a spec file or a method name (e.g. mean-act)")
    if isinstance(inner, str) and inner.endswith(".json"):
        inner_spec = read_spec(inner)
    elif isinstance(inner, str):
        if inner in ("dsas", "lineas", "ablate"):
            raise BakeError(f"--inner: {inner} cannot be the inner map here (fit it first and pass the spec)")
        inner_spec = fit(model, tok, source, target, inner, sites, 1.0, causal=causal, batch_size=batch_size,
                         pooling=pooling)
    else:
        inner_spec = inner
    infos = []
    inner_maps = {}
    for name, maps in inner_spec.sites:
        if name not in catalog:
            raise BakeError(f"--inner: site {name!r} is not a site of this model")
        merged = merge_maps(list(maps))
        if len(merged) != 1:
            raise BakeError(f"--inner: {name}: {len(merged)} maps that do not compose into one; gate one map per site")
        inner_maps[name] = _inner_map(merged[0], name)
        infos.append(catalog[name])
    pos = collect(model, tok, source, infos, batch_size, desc="source activations", pooling=pooling)
    neg = collect(model, tok, control, infos, batch_size, desc="control activations", pooling=pooling)
    g = torch.Generator().manual_seed(seed)
    report = {}
    for info in infos:
        p, n = pos[info.name], neg[info.name]
        ip, ineg = torch.randperm(len(p), generator=g), torch.randperm(len(n), generator=g)
        kp, kn = max(1, len(p) // 5), max(1, len(n) // 5)
        w, c = estimators.logistic(p[ip[kp:]], n[ineg[kn:]], pca=pca)
        acc = float(torch.cat([((p[ip[:kp]].double() @ w + c) > 0).double(),
                               ((n[ineg[:kn]].double() @ w + c) <= 0).double()]).mean())
        report[info.name] = round(acc, 4)
        if acc < min_accuracy:
            continue
        w, c = estimators.logistic(p, n, pca=pca)  # refit on everything for the kept site
        gate = Map("gated", float(strength), {"w": w.float(), "c": c.reshape(1).float()}, inner=inner_maps[info.name])
        _check_finite(gate.tensors, info.name)
        spec.sites.append((info.name, [gate]))
    if not spec.sites:
        raise BakeError(f"fit dsas: no site's detector reached --min-accuracy {min_accuracy:g} on held-out texts "
                        f"(best {max(report.values()):.2f}); more or cleaner data, or a lower threshold")
    spec.model = fingerprint(model, [catalog[n] for n, _ in spec.sites])  # the sites actually kept
    spec.params["sites"] = [n for n, _ in spec.sites]
    spec.params.update({"inner": inner if isinstance(inner, str) else inner_spec.method, "min_accuracy": min_accuracy,
                        "pca": pca, "seed": seed, "detector_accuracy": report,
                        "kept_sites": len(spec.sites), "candidate_sites": len(infos)})
    spec.provenance["n_control"] = len(control)
    return spec


def describe_file(path: str | Path, n: int) -> dict:
    return {"file": Path(path).name, "sha256": file_digest(path), "n": n}
