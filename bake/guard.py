"""What each command reads, for the --out guard: no command's output may be, contain or lie inside any
of its inputs (DESIGN invariant 2). The checks themselves are `exporters.check_out` (directories) and
`exporters.check_file_out` (files); this module only lists the inputs."""

from __future__ import annotations

from pathlib import Path

from .spec import tensors_name


def model_inputs(name: str | None, what: str = "model") -> list[tuple[str, Path]]:
    """The model as typed (a directory or a .gguf file), and, for an alias, its GGUF and the float32
    conversion in bake's cache, which later runs read."""
    if not name:
        return []
    from .models.loading import ALIASES, cache_dir

    found = [(what, Path(name))]
    if name in ALIASES:
        alias = ALIASES[name]
        found += [(what, cache_dir() / "models" / alias.cache_name), (what, cache_dir() / "gguf" / alias.gguf)]
    return found


def spec_inputs(specs, what: str = "spec") -> list[tuple[str, Path]]:
    """The files read specs came from: each manifest and the tensor file it names."""
    return [(label, f) for s in specs for label, f in ((f"{what} file", s.path), (f"{what}'s tensor file", s.tensors_path))
            if f is not None]


def file_inputs(*pairs: tuple[str, str | Path | None]) -> list[tuple[str, Path]]:
    """(what, path) for each given path; None and `bake:` data names are skipped."""
    return [(what, Path(p)) for what, p in pairs if p and not str(p).startswith("bake:")]


def spec_outputs(out: str | Path) -> list[Path]:
    """What writing the spec manifest `out` writes besides it: its tensor file."""
    return [Path(out).parent / tensors_name(Path(out))]
