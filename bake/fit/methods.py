"""The fit methods: one registry entry each, with its defaults, the options it takes, its own option
checks (`validate`) and its fitter (`run`). `check` runs the checks every fit shares, then the method's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BakeError
from . import ablate, dsas, estimators, lineas
from .collect import KEEP_FIRST, POOLINGS
from .persite import fit_per_site

SUPPORTS = ("none", "source-range")


def _no_checks(config, counts) -> None:
    """A method with no options of its own."""


def _never(config) -> bool:
    """A method that does not train end to end."""
    return False


def _no_report(spec, config) -> list[str]:
    """A method with nothing to say after its fit beyond the common lines."""
    return []


@dataclass(frozen=True)
class Method:
    """A registry entry: what the method fits, its defaults, and its hooks."""
    kind: str  # the map kind it fits
    estimate: Callable[..., dict[str, torch.Tensor]] | None  # (source [N, d], target [M, d], FitConfig) → tensors
    pooling: str  # default pooling of token activations per text
    default_sites: str
    about: str
    run: Callable = fit_per_site  # (Job, Method) → Spec; the per-site loop over `estimate` by default
    validate: Callable = _no_checks  # (FitConfig, TextCounts | None) → None, BakeError on a bad option
    options: tuple[str, ...] = ()  # FitConfig options only some methods take, that this one takes
    poolings: tuple[str, ...] = POOLINGS  # the poolings it accepts (each also with KEEP_FIRST but "last")
    trains: Callable = _never  # (FitConfig) → does it train end to end?
    report: Callable = _no_report  # (Spec, FitConfig) → lines `bake fit` prints after the fit


def _check_knots(c, counts) -> None:
    """monotone-pwl: 2 ≤ knots ≤ the smaller text count."""
    if counts is not None and not 2 <= c.knots <= min(counts.source, counts.target):
        raise BakeError(f"--knots: {c.knots} quantiles need 2 ≤ knots ≤ the smaller text count "
                        f"({min(counts.source, counts.target)})")


def _est(f) -> Callable:
    """An estimator of (source, target) as a registry `estimate` (which also gets the FitConfig)."""
    return lambda s, t, c: f(s, t)


METHODS: dict[str, Method] = {
    "linear-act": Method("affine", _est(estimators.linear_act), "mean", "post-norms",
                         "per unit, least-squares line through matched sorted samples (AcT)"),
    "mean-act": Method("affine", _est(estimators.mean_act), "mean", "post-norms",
                       "per unit shift of the mean: a = 1, b = μt − μs"),
    "gaussian-act": Method("affine", _est(estimators.gaussian_act), "mean", "post-norms",
                           "per unit mean and std matching: a = σt/σs, b = μt − aμs"),
    "aura": Method("affine", _est(estimators.aura), "max", "mlp-in",
                   "dampen source-detecting units: a = 1 − 2(AUROC − ½) where AUROC > ½ (max-pooled)"),
    "caa": Method("additive", _est(estimators.caa), "mean", "residual",
                  "add the mean difference v = μt − μs"),
    "iti-c": Method("additive", _est(estimators.iti_c), "mean", "attn-out",
                    "add the classifier normal scaled by the projected mean gap"),
    "monotone-pwl": Method("monotone-pwl", lambda s, t, c: estimators.monotone_pwl(s, t, c.knots), "mean",
                           "post-norms", "per unit, full 1-D optimal transport through K matched quantiles",
                           validate=_check_knots, options=("knots",)),
    "ablate": Method("projection", None, "mean", "attn-out,mlp-out",
                     "remove the mean-difference direction of the residual stream at every write",
                     run=ablate.fit_ablate, validate=ablate.validate, report=ablate.report,
                     options=("direction_layer", "reference", "direction", "layer_directions", "kernel",
                              "orthogonalize", "norm_preserving", "rank")),
    "dsas": Method("gated", None, "mean", "post-norms",
                   "gate an inner map per token: σ(w·x + c) from a source-vs-control logistic detector per site",
                   run=dsas.run_dsas, validate=dsas.validate, report=dsas.report,
                   options=("inner", "min_accuracy", "pca", "joint", "lineas", "gate_form"), trains=lambda c: c.joint),
    "lineas": Method("affine", None, "mean", "post-norms",
                     "per-unit affine maps at all sites trained jointly (end-to-end W2), optional sparse group lasso",
                     run=lineas.fit_lineas, validate=lineas.validate, report=lineas.report, options=("lineas",),
                     trains=lambda c: True),
}

PIPELINE_METHODS = tuple(k for k, m in METHODS.items() if m.estimate is not None)
STRICT = {"reference": ("zero", "a reference"), "direction": (None, "a direction")}  # refused where not taken


def check(c, counts=None) -> None:
    """The checks every fit shares, in the order the CLI has always reported them, then the method's own."""
    if c.method not in METHODS:
        raise BakeError(f"--method: unknown method {c.method!r} (known: {', '.join(METHODS)})")
    meth = METHODS[c.method]
    if c.support not in SUPPORTS:
        raise BakeError(f"--support: unknown support {c.support!r} (known: {', '.join(SUPPORTS)})")
    if c.support != "none" and meth.kind != "affine":
        raise BakeError(f"--support: only affine methods take a support; {c.method} fits {meth.kind} maps")
    for option, (default, what) in STRICT.items():
        if getattr(c, option) != default and option not in meth.options:
            owners = ", ".join(k for k, m in METHODS.items() if option in m.options)
            raise BakeError(f"--{option}: only {owners} takes {what}; {c.method} fits {meth.kind} maps")
    _check_pooling(c.pooling or meth.pooling, meth)
    if c.texts_per_batch < 1:
        raise BakeError(f"--batch-size: must be at least 1, got {c.texts_per_batch}")
    if c.pca is not None and c.pca < 1:  # a DSAS option, refused for every method as the CLI always has
        raise BakeError(f"--pca: must be at least 1, got {c.pca}")
    meth.validate(c, counts)


def _check_pooling(pooling: str, meth: Method) -> None:
    """The pooling must be one the method accepts, optionally with KEEP_FIRST (not "last+first")."""
    if pooling.removesuffix(KEEP_FIRST) not in meth.poolings or pooling == "last" + KEEP_FIRST:
        raise BakeError(f"--pooling: unknown pooling {pooling!r} (known: {', '.join(meth.poolings)}; "
                        f"mean{KEEP_FIRST} and max{KEEP_FIRST} pool the first token too)")
