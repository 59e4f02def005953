"""Exporters: plan + model → files. They never fold; they write what the passes left in memory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BakeError


def check_out(out: Path, force: bool, model_source: Path | str | None = None) -> None:
    """Refuse an --out that would clobber work or sit inside the model being read."""
    if model_source is not None and isinstance(model_source, Path):
        src = model_source.resolve()
        dst = out.resolve()
        if dst == src or src in dst.parents:
            raise BakeError(f"--out: {str(out)!r} is inside the model directory {str(model_source)!r}")
    if out.exists() and not out.is_dir():
        raise BakeError(f"--out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BakeError(f"--out: {str(out)!r} exists and is not empty (pass --force to replace it)")


@contextlib.contextmanager
def staged(out: Path, force: bool):
    """Yield a temp dir beside `out`; on success it replaces `out`, on any failure it vanishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.bake-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is not
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        old = None
        if out.exists():
            if any(out.iterdir()) and not force:
                raise BakeError(f"--out: {str(out)!r} appeared meanwhile and is not empty")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
