"""fit: estimate a spec from source (unwanted) and target (wanted) text sets."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import BakeError
from ..maps import Map
from ..models import adapter_for, fingerprint
from ..runtime import steered
from ..spec import Spec, file_digest
from . import estimators
from .collect import LayerReplay, collect

METHODS = ("linear-act", "mean-act")
SUPPORTS = ("none", "source-range")


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


def estimate(method: str, src: torch.Tensor, tgt: torch.Tensor, support: str) -> dict[str, torch.Tensor]:
    t = estimators.linear_act(src, tgt) if method == "linear-act" else estimators.mean_act(src, tgt)
    if support == "source-range":
        t.update(estimators.source_range(src))
    return t


def fit(model, tok, source: list[str], target: list[str], method: str, sites: list[str], strength: float = 1.0,
        support: str = "none", causal: bool = True, batch_size: int = 16, provenance: dict | None = None) -> Spec:
    """Fit one affine map per site. Causal estimation collects the source activations of each site
    with the maps of all earlier sites active (graph order), so later maps see what they will
    really receive; target activations are collected once, unsteered."""
    if method not in METHODS:
        raise BakeError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
    if support not in SUPPORTS:
        raise BakeError(f"--support: unknown support {support!r} (known: {', '.join(SUPPORTS)})")
    adapter = adapter_for(model)
    catalog = adapter.sites(model)
    names = adapter.resolve(model, sites)
    infos = [catalog[n] for n in names]
    fp = fingerprint(model, infos)
    params = {"sites": sites, "support": support, "causal": causal, "pooling": "mean over non-pad tokens"}
    spec = Spec([], method=method, params=params, provenance=dict(provenance or {}), model=fp)
    spec.provenance.update({"bake_version": __version__, "created": datetime.date.today().isoformat(),
                            "n_source": len(source), "n_target": len(target)})
    tgt = collect(model, tok, target, infos, batch_size, desc="target activations")
    if causal:
        replay = LayerReplay(model, tok, source, batch_size, adapter.layers_prefix())
    else:
        src = collect(model, tok, source, infos, batch_size, desc="source activations")
    for info in tqdm(infos, desc=f"fit {method}", unit="site", disable=not causal):
        if not causal:
            s = src[info.name]
        else:
            with steered(model, spec, check_model=False):
                layer = replay.layer_of(info.module)
                if layer is not None:  # run only this site's layer, from inputs with earlier maps on
                    replay.advance(layer)
                    s = replay.collect(info)
                else:  # a site outside the decoder layers: a full forward with earlier maps on
                    s = collect(model, tok, source, [info], batch_size, progress=False)[info.name]
        tensors = estimate(method, s, tgt[info.name], support)
        for k, v in tensors.items():
            if not torch.isfinite(v).all():
                raise BakeError(f"fit: non-finite {k} at {info.name} (are the activations finite?)")
        spec.sites.append((info.name, [Map("affine", float(strength), tensors)]))
    return spec


def describe_file(path: str | Path, n: int) -> dict:
    return {"file": Path(path).name, "sha256": file_digest(path), "n": n}
