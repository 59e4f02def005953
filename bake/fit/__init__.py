"""fit: estimate a spec from source (unwanted) and target (wanted) text sets.

    fit(model, tok, source, target, FitConfig("mean-act", ["post-norms"], strength=0.8))

The options are one FitConfig (`config`); each method is an entry of `METHODS` (`methods`) with its
defaults, its own option checks and its fitter. `run_fit` (`run`) is what `bake fit` calls: read
the texts, load the model, fit (distributed under torchrun), write the spec, return what to print.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from .. import __version__
from ..errors import BakeError
from ..families import adapter_for
from ..models import fingerprint
from ..spec import Spec, file_digest
from . import estimators
from .ablate import DIRECTIONS, REFERENCES
from .collect import KEEP_FIRST, first_token
from .config import FIT_CONFIG_VERSION, FitConfig, TextCounts
from .job import Job
from .lineas import LineasConfig
from .methods import METHODS, PIPELINE_METHODS, SUPPORTS, Method
from .run import FitResult, run_fit

__all__ = ["fit", "run_fit", "FitConfig", "FitResult", "LineasConfig", "TextCounts", "METHODS", "Method",
           "PIPELINE_METHODS", "SUPPORTS", "REFERENCES", "DIRECTIONS", "FIT_CONFIG_VERSION", "read_texts",
           "describe_file", "estimators"]


def chat_turns(tok, texts: list[str], system: str | None = None) -> list[str]:
    """Each text as the chat template's user turn, ready for the answer (`--chat`)."""
    from ..evaluation.refusal import chat_texts

    if not getattr(tok, "chat_template", None):
        raise BakeError("--chat: this model's tokenizer has no chat template")
    return chat_texts(tok, texts, system)


BUILTIN = "bake:"  # --source bake:harmful[:split]: a prompt set bake ships (bake.evaluation.refusal_data)


def read_texts(path: str | Path, field: str) -> list[str]:
    """The non-empty lines of a UTF-8 file (at least 2), or prompt sets bake ships (`bake:KIND[+KIND…][:SPLIT]`,
    split `fit` by default; `bake:harmless+benign`: both sets, in that order), or a BakeError naming `field`."""
    if str(path).startswith(BUILTIN):
        from ..evaluation.refusal_data import prompts

        kinds, _, split = str(path)[len(BUILTIN):].partition(":")
        return [t for kind in kinds.split("+") for t in prompts(kind, split or "fit")]
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


def fit(model, tok, source: list[str], target: list[str], config: FitConfig | str | None = None, *legacy,
        control: list[str] | None = None, provenance: dict | None = None, progress: bool = True,
        **legacy_options) -> Spec:
    """Fit the spec that `config` describes from the source (unwanted) and target (wanted) texts;
    `control`: DSAS's neutral texts; `provenance`: recorded in the spec beside the text counts.

    Old calls `fit(model, tok, source, target, "mean-act", sites, strength, ..., knots=4)` still work:
    a method name with the old positional and keyword options is turned into a FitConfig."""
    if not isinstance(config, FitConfig):
        config, provenance = _legacy_config(config, legacy, legacy_options, provenance)
    elif legacy or legacy_options:
        raise BakeError(f"fit: options go in the FitConfig, not beside it ({', '.join(legacy_options) or legacy})")
    config.check(TextCounts(len(source), len(target), None if control is None else len(control)))
    if config.chat:
        source, target, control = (None if t is None else chat_turns(tok, t, config.system)
                                    for t in (source, target, control))
    job = _prepare(model, tok, list(source), list(target), control, config, provenance, progress)
    meth = METHODS[config.method]
    return meth.run(job, meth)


LEGACY_POSITIONAL = ("sites", "strength", "support", "causal", "batch_size", "provenance")


def _legacy_config(method, args: tuple, options: dict, provenance) -> tuple[FitConfig, dict | None]:
    """The old `fit(..., method, sites, strength, support, causal, batch_size, provenance, **options)`
    as a FitConfig. Training methods ignored the old batch_size (LinEAS used its own), and still do."""
    if len(args) > len(LEGACY_POSITIONAL):
        raise BakeError(f"fit: at most {len(LEGACY_POSITIONAL)} positional options after the method")
    options = {**dict(zip(LEGACY_POSITIONAL, args)), **options}
    provenance = options.pop("provenance", provenance)
    method = options.pop("method", method)
    config = FitConfig(method, **options)
    if config.trains:
        config = FitConfig(method, **{**options, "batch_size": None})
    return config, provenance


def _default_sites(adapter, model, meth) -> list[str]:
    """The method's usual presets that this model offers (all of them, and the error naming what is
    offered, where it offers none)."""
    usual = meth.default_sites.split(",")
    offered = set(adapter.offered(model))
    return [p for p in usual if p in offered] or usual


def _prepare(model, tok, source, target, control, config: FitConfig, provenance, progress) -> Job:
    """Resolve the sites on the model, fingerprint it, and start the spec (method, params, provenance)."""
    from .distributed import active as distributed

    meth, c = METHODS[config.method], config
    adapter = adapter_for(model)
    pipeline = adapter.modality == "text-to-image"
    if distributed() and pipeline:
        raise BakeError("distributed fit: not available for diffusers pipelines yet (run it in one process)")
    if pipeline and (meth.estimate is None or c.support != "none"):
        raise BakeError(f"--method: {c.method}{' with --support' if c.support != 'none' else ''} is not available "
                        f"for diffusers pipelines yet (use {', '.join(PIPELINE_METHODS)})")
    sites = list(c.sites or (["norms"] if pipeline else _default_sites(adapter, model, meth)))
    catalog = adapter.sites(model)
    infos = [catalog[n] for n in adapter.resolve(model, sites)]
    pooling = c.pooling or meth.pooling
    params = {"sites": sites, "support": c.support, "causal": c.causal, "pooling": pooling}
    if c.chat:
        params["chat"] = "each text a user turn of the chat template, with the generation prompt"
        if c.system:
            params["system"] = c.system
    if not pipeline and pooling in ("mean", "max"):  # leave the first token out only where it is a BOS or sink
        first = first_token(model, tok, source + target)
        params["first_token"] = ("left out: " if first["drop"] else "pooled: ") + first["why"]
        pooling = pooling if first["drop"] else pooling + KEEP_FIRST
    if "knots" in meth.options:
        params["knots"] = c.knots
    spec = Spec([], method=c.method, params=params, provenance=dict(provenance or {}),
                model=fingerprint(model, infos))
    spec.provenance.update({"bake_version": __version__, "created": datetime.date.today().isoformat(),
                            "n_source": len(source), "n_target": len(target)})
    return Job(model, tok, source, target, control, config, sites, spec, adapter, catalog, infos, pooling,
               pipeline, progress)


def describe_file(path: str | Path, n: int) -> dict:
    """A text file in a spec's provenance: its name, digest and text count (a built-in set: its name and
    the digest of its texts)."""
    if str(path).startswith(BUILTIN):
        import hashlib

        text = "\n".join(read_texts(path, "--source"))
        return {"file": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(), "n": n}
    return {"file": Path(path).name, "sha256": file_digest(path), "n": n}
