"""The fitter of the per-site estimators (AcT family, AurA, CAA, ITI-c, monotone-pwl): one map per
site from that site's pooled source and target activations."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..maps import Map
from ..runtime import steered
from ..spec import Spec
from . import estimators
from .collect import LayerReplay, collect
from .job import Job, check_finite


def fit_per_site(job: Job, meth) -> Spec:
    """Causal estimation collects the source activations of each site with the maps of all earlier
    sites active (graph order), so later maps see what they will really receive; target activations
    are collected once, unsteered. A diffusers pipeline goes to `_fit_pipeline`."""
    if job.pipeline:
        return _fit_pipeline(job, meth)
    c, spec = job.config, job.spec
    model, tok, bs, pooling = job.model, job.tok, job.batch_size, job.pooling
    tgt = collect(model, tok, job.target, job.infos, bs, desc="target activations", pooling=pooling)
    if c.causal:
        replay = LayerReplay(model, tok, job.source, bs, job.adapter.layers_prefix())
    else:
        src = collect(model, tok, job.source, job.infos, bs, desc="source activations", pooling=pooling)
    for info in tqdm(job.infos, desc=f"fit {c.method}", unit="site", disable=not c.causal):
        if not c.causal:
            s = src[info.name]
        else:
            with steered(model, spec, check_model=False):
                layer = replay.layer_of(info.module)
                if layer is not None:  # run only this site's layer, from inputs with earlier maps on
                    replay.advance(layer)
                    s = replay.collect(info, pooling)
                else:  # a site outside the decoder layers: a full forward with earlier maps on
                    s = collect(model, tok, job.source, [info], bs, progress=False, pooling=pooling)[info.name]
        tensors = meth.estimate(s, tgt[info.name], c)
        if c.support == "source-range":
            tensors.update(estimators.source_range(s))
        check_finite(tensors, info.name)
        spec.sites.append((info.name, [Map(meth.kind, job.strength, tensors)]))
    if meth.kind == "affine":
        spec.params["largest_slope"] = estimators.largest_slope(spec.sites)
    return spec


def _fit_pipeline(job: Job, meth) -> Spec:
    """A diffusers pipeline: activations pooled over pixels and tokens after one denoising step."""
    from .diffusion import collect_pipeline

    c, spec = job.config, job.spec
    spec.params.update({"denoise_steps": 1, "seed": c.seed, "pooling": "mean over pixels and tokens"})
    tgt = collect_pipeline(job.model, job.target, job.infos, seed=c.seed, batch_size=job.batch_size,
                           desc="target activations", progress=job.progress)
    src = collect_pipeline(job.model, job.source, job.infos, seed=c.seed, batch_size=job.batch_size,
                           desc="source activations", progress=job.progress)
    for info in job.infos:
        tensors = meth.estimate(src[info.name], tgt[info.name], c)
        check_finite(tensors, info.name)
        spec.sites.append((info.name, [Map(meth.kind, job.strength, tensors)]))
    return spec
