"""run_fit: what `bake fit` does, as one library call. Read the texts, check every option before the
model is loaded, load, fit (on every rank under torchrun / accelerate launch), write the spec, and
return the lines to print (the CLI prints them; nothing here prints)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BakeError
from ..spec import Spec
from .config import FitConfig, TextCounts

LARGE_SLOPE = 10.0  # fit warns above this per-unit slope


@dataclass
class FitResult:
    """A finished fit: the spec (also on ranks that did not write it), where it was written, and the
    lines `bake fit` prints, warnings included (none on ranks other than 0)."""
    spec: Spec
    out: Path
    lines: list[str] = field(default_factory=list)


@dataclass
class _Inputs:
    """The texts read from the files, and the provenance that describes them."""
    source: list[str]
    target: list[str]
    control: list[str] | None
    provenance: dict


def run_fit(model: str, config: FitConfig, out: str | Path, source: str | Path, target: str | Path | None = None,
            control: str | Path | None = None, device: str = "cpu", device_map: str | None = None) -> FitResult:
    """Fit `config` on the model `model` (directory, .gguf, hub id or alias) from the text files
    `source`, `target` and `control` (one text per line) and write the spec manifest `out` (.json).
    Bad input is a BakeError before the model is loaded."""
    from . import distributed as dist

    if Path(out).suffix != ".json":
        raise BakeError(f"--out: a spec manifest ends in .json, got {str(out)!r}")
    from ..models.loading import check_placement

    check_placement(device, device_map)  # a bad --device / --device-map is named before the model loads
    out = _check_out(Path(out), model, config, source, target, control)
    texts = _read_inputs(model, config, source, target, control)
    config.check(TextCounts(len(texts.source), len(texts.target),
                            None if texts.control is None else len(texts.control)))
    if dist.init_from_env(device):  # launched by torchrun / accelerate launch: every rank runs this
        try:
            return _run_distributed(model, config, out, texts, device, device_map)
        finally:
            dist.finish()
    spec = _load_and_fit(model, config, texts, device, device_map)
    _write(spec, out)
    return FitResult(spec, out, report(spec, config, out))


def _check_out(out: Path, model: str, config: FitConfig, source, target, control) -> Path:
    """The spec (and its tensor file) must not be, or lie inside, anything the fit reads."""
    from .. import guard
    from ..exporters import check_file_out

    from ..spec import read

    inner = config.inner if config.method == "dsas" and (config.inner or "").endswith(".json") else None
    reads = [*guard.model_inputs(model), *guard.spec_inputs([read(inner)] if inner else [], "--inner spec"),
             *guard.file_inputs(("--source file", source), ("--target file", target), ("--control file", control))]
    return check_file_out(out, reads, also=guard.spec_outputs(out))


def _read_inputs(model: str, config: FitConfig, source, target, control) -> _Inputs:
    """The texts, and the provenance that names the model and digests the text files."""
    from . import describe_file, read_texts

    spec_inner = config.method == "dsas" and not config.joint and (config.inner or "").endswith(".json")
    if target is None and not spec_inner:
        raise BakeError("--target: required (texts to steer towards, one per line)")
    src = read_texts(source, "--source")
    tgt = read_texts(target, "--target") if target is not None else []
    provenance = {"model": model, "source": describe_file(source, len(src))}
    if target is not None:
        provenance["target"] = describe_file(target, len(tgt))
    ctrl = read_texts(control, "--control") if control else None
    return _Inputs(src, tgt, ctrl, provenance)


def _load_and_fit(model: str, config: FitConfig, texts: _Inputs, device: str, device_map, progress=True) -> Spec:
    """Load the model (on `device`, or spread by `device_map`) and fit."""
    from ..models import load
    from . import fit

    loaded = load(model, device=device, device_map=device_map)
    return fit(loaded.model, loaded.tokenizer, texts.source, texts.target, config, control=texts.control,
               provenance=texts.provenance, progress=progress)


def _write(spec: Spec, out: Path) -> None:
    """Write the manifest and its tensors (beside it), all or nothing."""
    from ..spec import write

    write(spec, out)


def _run_distributed(model: str, config: FitConfig, out: Path, texts: _Inputs, device: str, device_map) -> FitResult:
    """One rank of a distributed fit: its shard of the texts, all rows gathered, rank 0 writes."""
    from . import distributed as dist

    first = dist.rank() == 0
    spec = _load_and_fit(model, config, texts, dist.local_device(device), device_map, progress=first)
    spec.provenance["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    lines = []
    if first:
        _write(spec, out)
        lines.append(f"wrote {out} ({len(spec.sites)} sites, method {config.method}, λ={config.strength:g}; "
                     f"{spec.provenance['world_size']} processes)")
    dist.barrier()
    return FitResult(spec, out, lines)


def report(spec: Spec, config: FitConfig, out: Path) -> list[str]:
    """The lines `bake fit` prints after a single-process fit: what was written, the method's own
    summary, and a warning where an affine map's slope amplifies noise (|a| > LARGE_SLOPE)."""
    from .methods import METHODS

    lines = [f"wrote {out} ({len(spec.sites)} sites, method {config.method}, λ={config.strength:g})"]
    slope = spec.params.get("largest_slope")
    if slope and slope["a"] > LARGE_SLOPE:
        lines.append(f"{config.method}: warning: slopes up to |a| = {slope['a']:g} ({slope['site']}, unit "
                     f"{slope['unit']}) amplify that unit's noise; consider --support source-range or mean-act")
    return lines + METHODS[config.method].report(spec, config)
