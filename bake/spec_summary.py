"""A readable summary of a spec (what `bake inspect` prints)."""

from __future__ import annotations

from .maps import Map
from .spec import Spec


def _map_line(m: Map) -> str:
    if m.foldable:
        lin = m.to_linear()
        ident = lin.identity_units()
        extra = ""
        if m.kind == "affine":
            a, b = lin.diag, lin.bias
            extra = f"|a'−1| mean {float((a - 1).abs().mean()):.3g} max {float((a - 1).abs().max()):.3g}, " \
                    f"‖b'‖ {float(b.norm()):.3g}, identity units {ident}/{m.units}"
        elif m.kind == "additive":
            extra = f"‖λv‖ {float(lin.bias.norm()):.3g}"
        else:
            extra = f"rank {m.tensors['U'].shape[1]}"
        return f"{m.kind} λ={m.strength:g}: {extra}"
    if m.kind == "affine":
        return f"affine λ={m.strength:g} with support [lo, hi] (not foldable)"
    if m.kind == "monotone-pwl":
        return f"monotone-pwl λ={m.strength:g}: {m.tensors['xs'].shape[1]} knots per unit (not foldable)"
    if m.kind == "units":
        g = m.tensors["gate"]
        return f"units λ={m.strength:g}: {g.shape[0]} MLP unit(s) reading {g.shape[1]} inputs (folds by growing the MLP)"
    return f"gated λ={m.strength:g} around {m.inner.kind} (not foldable)"


def summary(spec: Spec) -> list[str]:
    fp = spec.model
    lines = [
        f"spec {spec.path.name if spec.path else '(unsaved)'}: method {spec.method}, {len(spec.sites)} site(s), "
        f"{sum(len(m) for _, m in spec.sites)} map(s)",
        f"model: {fp.get('architecture', '?')} ({fp.get('model_type', '?')}), "
        + ", ".join(f"{k}={v}" for k, v in fp.get("shapes", {}).items()),
    ]
    if spec.params:
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in spec.params.items()))
    if spec.provenance:
        lines.append("provenance: " + ", ".join(
            f"{k}={v['file'] if isinstance(v, dict) and 'file' in v else v}" for k, v in spec.provenance.items()))
    for site, maps in spec.sites:
        for m in maps:
            lines.append(f"  {site}: {_map_line(m)}")
    return lines
