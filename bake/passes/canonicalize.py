"""Pass 1: apply strengths, compose consecutive foldable maps into one, drop identities."""

from __future__ import annotations

from ..maps import LinearMap, Map
from ..plan import Plan
from .weights import describe

NAME = "canonicalize"


def run(plan: Plan, sites=None) -> None:
    for sp in plan.sites if sites is None else sites:
        segments: list[Map | LinearMap] = []
        for m in sp.maps:
            if m.strength == 0:
                continue  # λ = 0 is the identity for every kind
            if m.has_support and plan.approximate:
                m = Map("affine", m.strength, {"a": m.tensors["a"], "b": m.tensors["b"]})
                plan.note(NAME, sp.name, "approximate: support [lo, hi] dropped, the affine map folds as unbounded")
            if m.foldable:
                lin = m.to_linear()
                if segments and isinstance(segments[-1], LinearMap):
                    segments[-1] = segments[-1].then(lin)
                else:
                    segments.append(lin)
            else:
                segments.append(m)
        sp.pending = [s for s in segments if not (isinstance(s, LinearMap) and s.is_identity)]
        if not sp.pending:
            plan.note(NAME, sp.name, f"{len(sp.maps)} map(s) are the identity: dropped")
        else:
            parts = [describe(s) if isinstance(s, LinearMap) else _opaque(s) for s in sp.pending]
            plan.note(NAME, sp.name, f"{len(sp.maps)} map(s) → " + "; ".join(parts))


def _opaque(m) -> str:
    """How a map that is not one linear step is named in the report."""
    return f"{m.kind} (grows the MLP)" if m.needs_context else f"{m.kind} (not foldable)"
