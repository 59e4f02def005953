"""DSAS's gate written as MLP units (`bake fit --method dsas --gate-form units`): a gate that folds.

DSAS adds σ(s)·v to the residual stream, s = w·x + c a logistic detector of the site's activation x.
No stock layer computes a sigmoid of the input, but a gated MLP computes silu(g·z)·(u·z) per unit, z
its (normalised) input. So the detector here reads z, the input of layer L's MLP, and the vector is
added at that MLP's output (the same residual write as layer L's output, where the MLP is the last
writer), through two more units:

    f(s) = [silu(k·t) − silu(k·(t − 1))] / k ≈ clamp(t, 0, 1),   t = s/4 + 1/2,

the hard sigmoid with σ's slope at 0 (softened over |Δt| ≈ 1/k). Units are linear in z, so every
constant rides on a direction u with u·z ≈ 1 on every token (ridge: u = (ZᵀZ + r·I)⁻¹Zᵀ1, over the
tokens of both text sets; RMSNorm's output has a near-constant component, measured below):

    gate rows  k·(w/4 + (c/4 + 1/2)·u),  k·(w/4 + (c/4 − 1/2)·u);   up rows  u, u;   down  [v/k, −v/k]

so the `units` map is x + λ·v·f(s)·(u·z). The spec is exact as written (the baked model equals it
hooked); how near f(s)·(u·z) is to σ(s) is measured on the fit texts and recorded in the spec
(`gate_agreement`), and what counts is the steering it gives, measured on held-out prompts."""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..maps import Map
from . import estimators
from .collect import collect_tokens

K = 8.0  # sharpness of the two silu units (f's corners soften over |Δs| ≈ 4/k)
RIDGE = 1e-3  # u's ridge, relative to the mean of diag(ZᵀZ)


def units_site(adapter, catalog: dict, site: str) -> tuple[str, str, float]:
    """(MLP input site, MLP output site, c) for an inner map at `site`: the MLP's own output, or the
    residual after a layer whose last writer is a gated MLP's down projection (the stream adds c times it)."""
    info = catalog[site]
    writer, c = (info.module, 1.0) if adapter.mlp_of(info) else (info.writer, info.writer_scale)
    out = f"{writer}:output" if writer else None
    if out is None or out not in catalog or adapter.mlp_of(catalog[out]) is None:
        raise BakeError(f"--gate-form units: {site}: the gate is written as units of a gated MLP, so the inner map "
                        f"goes at an MLP's output or the residual after a layer whose MLP writes it last")
    gate = adapter.mlp_of(catalog[out])[0]
    return f"{gate}:input", out, c


def ones_direction(z: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """u with u·z ≈ 1 on every row of z [n, d] (ridge least squares, float64)."""
    z = z.double()
    A = z.T @ z
    A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(A, z.sum(0))


def gate_units(w: torch.Tensor, c: float, u: torch.Tensor, v: torch.Tensor, strength: float, k: float = K) -> Map:
    """The units map x + λ·v·f(w·z + c)·(u·z) (module docstring)."""
    w, u, v = w.double(), u.double(), v.double()
    gate = torch.stack([k * (w / 4 + (c / 4 + 0.5) * u), k * (w / 4 + (c / 4 - 0.5) * u)])
    down = torch.stack([v / k, -v / k], dim=1)
    return Map("units", strength, {"gate": gate.float(), "up": torch.stack([u, u]).float(), "down": down.float()})


def unit_gate(m: Map, z: torch.Tensor, k: float = K) -> torch.Tensor:
    """The units map's gate f(s)·(u·z) on rows z (what multiplies v; down's columns are ±v/k)."""
    z = z.double()
    h = torch.nn.functional.silu(z @ m.tensors["gate"].double().T) * (z @ m.tensors["up"].double().T)
    return (h[..., 0] - h[..., 1]) / k


def fit_units(job, inner_maps: dict, min_accuracy: float, held_out) -> tuple[list, dict]:
    """Per inner site: the detector on the MLP input, u, and the units map; sites below min_accuracy are
    left out. Returns ([(site, [map])], report)."""
    sites = {s: units_site(job.adapter, job.catalog, s) for s in inner_maps}
    outs = [o for _, o, _ in sites.values()]
    if len(set(outs)) < len(outs):
        twice = next(o for o in outs if outs.count(o) > 1)
        raise BakeError(f"--gate-form units: --inner: two of its sites are written by the same MLP ({twice}); "
                        f"keep one of them")
    zs = [job.catalog[z] for z, _, _ in sites.values()]
    pos_tokens, pos = collect_tokens(job.model, job.tok, job.source, zs, job.batch_size, "source MLP inputs", job.pooling)
    neg_tokens, neg = collect_tokens(job.model, job.tok, job.control, zs, job.batch_size, "control MLP inputs", job.pooling)
    out, report = [], {}
    for site, (zin, zout, scale) in sites.items():
        v = _additive(inner_maps[site], site) / scale
        acc = held_out(pos[zin], neg[zin])
        tokens = torch.cat([pos_tokens[zin], neg_tokens[zin]])
        u = ones_direction(tokens)
        ones = tokens.double() @ u
        w, b = estimators.logistic(pos[zin], neg[zin], pca=job.config.pca)
        m = gate_units(w, float(b), u, v, job.strength)
        z_all = torch.cat([pos[zin], neg[zin]])
        sig = torch.sigmoid(z_all.double() @ w.double() + float(b))
        report[zout] = {"detector_site": zin, "detector_accuracy": acc, "inner_site": site,
                        "u_dot_z": {"mean": round(float(ones.mean()), 5), "std": round(float(ones.std()), 5),
                                    "min": round(float(ones.min()), 4), "max": round(float(ones.max()), 4)},
                        "gate_agreement": round(float((unit_gate(m, z_all) - sig).abs().mean()), 4)}
        if acc >= min_accuracy:
            out.append((zout, [m]))
    return out, report


def _additive(m: Map, site: str) -> torch.Tensor:
    """v of an inner map that adds a constant (additive, or affine with unit scales)."""
    lin = m.to_linear() if m.foldable else None
    if lin is None or not lin.scale_is_identity:
        raise BakeError(f"--gate-form units: --inner: {site}: the units gate adds a vector (an additive map); "
                        f"a {m.kind} map scales the activation, which the MLP's new units cannot read")
    return lin.bias.double()
