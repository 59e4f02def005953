"""Spec algebra: composition (`bake compose`) and inversion (`bake invert`).

compose: per site, the maps of every spec in order (spec 1's first). Consecutive per-unit maps
(affine without support, additive) collapse into one affine map (affine ∘ affine is affine),
with their strengths folded in (λ = 1); other maps stay as they are, in order.

invert: per site, the maps in reverse order, each replaced by its inverse:
affine x ↦ a'x + b' (a' = 1 + λ(a − 1), b' = λb) ↦ (x − b')/a', refused where some a' = 0;
additive x + λv ↦ x − λv; projection x − λUUᵀx (λ ≠ 1) ↦ x + λ/(1 − λ)·UUᵀx, refused at λ = 1
(it removes a direction: nothing can bring it back). Inverting a detox map gives a map that
induces what the original removes.
"""

from __future__ import annotations

import torch

from .errors import BakeError
from .maps import Map
from .spec import Spec

DIAGONAL = ("affine", "additive")


def _diagonal(m: Map) -> bool:
    return m.kind in DIAGONAL and not m.has_support


def _as_affine(maps: list[Map]) -> Map:
    """One affine map (λ = 1) equal to applying `maps` in order."""
    lin = maps[0].to_linear()
    for m in maps[1:]:
        lin = lin.then(m.to_linear())
    return Map("affine", 1.0, {"a": lin.diag.float(), "b": lin.bias.float()})


def merge_maps(maps: list[Map]) -> list[Map]:
    out: list[Map] = []
    run: list[Map] = []
    for m in maps + [None]:
        if m is not None and _diagonal(m):
            run.append(m)
            continue
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(_as_affine(run))
        run = []
        if m is not None:
            out.append(m)
    return out


def _models_differ(a: dict, b: dict) -> bool:
    """Two model blocks name different models. Where both carry `weights_digest` (the whole model) it
    decides, with the architecture and shapes; `weights_sha256` hashes only each spec's own sites, so
    specs of one model on different sites differ there. A spec written before the digest is compared on
    every field both carry."""
    keys = set(a) & set(b)
    if "weights_digest" in keys:
        keys.discard("weights_sha256")
    return any(a[k] != b[k] for k in keys)


def compose(specs: list[Spec], check_model: bool = True) -> Spec:
    if not specs:
        raise BakeError("compose: give at least one spec")
    blocks = [s.model for s in specs if s.model]
    clash = any(_models_differ(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
    if check_model and clash:
        raise BakeError("compose: the specs were fitted on different models (fingerprints differ); "
                        "pass --ignore-fingerprint to compose them anyway")
    order: list[str] = []
    per: dict[str, list[Map]] = {}
    for s in specs:
        for site, maps in s.sites:
            if site not in per:
                order.append(site)
                per[site] = []
            per[site] += maps
    sites = []
    for site in order:
        units = {m.units for m in per[site]}
        if len(units) > 1:
            raise BakeError(f"compose: site {site}: the specs' maps have different unit counts {sorted(units)}")
        sites.append((site, merge_maps(per[site])))
    return _checked(Spec(sites, method="compose", params={"of": [s.method for s in specs]},
                provenance={"composed": [{"file": s.path.name if s.path else None,
                                          "sha256": s.sha256() if s.path else None} for s in specs]},
                model=next((s.model for s in specs if s.model), {})))


def invert_map(m: Map, where: str) -> Map:
    if m.kind == "affine":
        if m.has_support:
            raise BakeError(f"invert: {where}: an affine map with a support has no inverse on the whole line")
        lin = m.to_linear()
        zero = int((lin.diag == 0).sum())
        if zero:
            raise BakeError(f"invert: {where}: {zero} unit(s) have scale a' = 0 (the map erases them): no inverse")
        return Map("affine", 1.0, {"a": (1 / lin.diag).float(), "b": (-lin.bias / lin.diag).float()})
    if m.kind == "additive":
        return Map("additive", 1.0, {"v": (-m.strength * m.tensors["v"].double()).float()})
    if m.kind == "projection":
        lam = m.strength
        if abs(1 - lam) < 1e-12:
            raise BakeError(f"invert: {where}: a projection at λ = 1 removes its directions; it has no inverse")
        return Map("projection", -lam / (1 - lam), {"U": m.tensors["U"]})
    if m.kind == "units":  # y = x + λ·D h(z): z is the MLP's input, which the map leaves alone, so x = y − λ·D h(z)
        return Map("units", -m.strength, m.tensors)
    raise BakeError(f"invert: {where}: a {m.kind} map has no closed-form inverse here")


def invert(spec: Spec) -> Spec:
    sites = [(site, [invert_map(m, f"{site} map {len(maps) - i}") for i, m in enumerate(reversed(maps))])
             for site, maps in spec.sites]
    return _checked(Spec(sites, method=f"invert({spec.method})", params=dict(spec.params),
                         provenance={"inverted": {"file": spec.path.name if spec.path else None,
                                                  "sha256": spec.sha256() if spec.path else None}},
                         model=spec.model))


def _checked(spec: Spec) -> Spec:
    for site, maps in spec.sites:
        for m in maps:
            for k, v in m.tensors.items():
                if not torch.isfinite(v).all():
                    raise BakeError(f"{site}: non-finite {k} after the operation (a scale too close to 0?)")
    return spec
