"""Where an output goes: refusing dangerous `--out` paths, and staging writes so that nothing is ever
half-written or destroyed.

A bake writes into a staging directory `.<out>.bake-<pid>-<random>` beside `--out` and, when every
file is complete and verified, swaps it into place. With `--force` over an existing output the swap is
one atomic `renameat2(RENAME_EXCHANGE)` where the filesystem offers it (Linux): at every instant `--out`
is either the old output or the new one. Elsewhere it is two renames through `.<out>.old-<pid>`; a run
killed between them leaves the old output there, and the next run into the same `--out` puts it back.
Staging directories of processes that died (kill -9, power loss) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import BakeError

_EXCHANGE = 2  # RENAME_EXCHANGE from <linux/fs.h>
_AT_FDCWD = -100


def _under_file(out: Path, flag: str = "--out") -> None:
    """An output path must not lie under a file."""
    for anc in out.parents:
        if anc.exists() and not anc.is_dir():
            raise BakeError(f"{flag}: {str(out)!r} lies under {str(anc)!r}, which is a file")


def _on_disk(inputs):
    """(what, as typed, resolved path) of each input that is on disk (hub ids and absent paths skipped)."""
    for what, inp in inputs:
        if inp is not None and isinstance(inp, (str, os.PathLike)) and Path(inp).exists():
            yield what, inp, Path(inp)


def check_out(out: Path, force: bool, inputs=()) -> None:
    """Refuse an --out that would clobber work or touch what the run reads: one that is empty or the
    working directory, lies under a file, or equals, contains or lies inside any input (the model, the
    spec and its tensor file, the prompts), after resolving symbolic links. `inputs`: (what, path)
    pairs, e.g. ("model directory", path); hub ids and absent paths are skipped."""
    if str(out).strip() in ("", "."):
        raise BakeError(f"--out: must name an output directory, got {str(out)!r}")
    _under_file(out)
    dst = out.resolve()
    cwd = Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        raise BakeError(f"--out: {str(out)!r} is the working directory or one of its parents")
    for what, inp, path in _on_disk(inputs):
        src = path.resolve()
        if dst == src or dst in src.parents:
            raise BakeError(f"--out: {str(out)!r} is or contains the {what} {str(inp)!r}; replacing it would "
                            f"destroy it (choose another --out)")
        if src in dst.parents:
            raise BakeError(f"--out: {str(out)!r} is inside the {what} {str(inp)!r}")
    if out.exists() and not out.is_dir():
        raise BakeError(f"--out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BakeError(f"--out: {str(out)!r} exists and is not empty (pass --force to replace it)")


def _same(a: Path, b: Path) -> bool:
    """One file, by resolved path or (both existing) by inode: a hard link is the same file too."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_file_out(out, inputs=(), flag: str = "--out", force: bool = True, also=()) -> Path:
    """Refuse a file output (a spec, a JSON or HTML report, a plot) that would destroy what the run
    reads: `out` (and each path of `also`, e.g. a spec's tensor file) must not be, or lie inside, any
    input, after resolving links (a hard link counts as the same file). `inputs`: (what, path) pairs;
    hub ids and absent paths are skipped. An existing directory at `out`, or a file among its parents,
    is refused; an existing file only without `force`. Returns `out` as a Path."""
    out = Path(out)
    if str(out).strip() in ("", "."):
        raise BakeError(f"{flag}: must name a file, got {str(out)!r}")
    if out.is_dir():
        raise BakeError(f"{flag}: {str(out)!r} is a directory; name a file to write")
    _under_file(out, flag)
    for path in (out, *map(Path, also)):
        for what, inp, src in _on_disk(inputs):
            if _same(path, src):
                raise BakeError(f"{flag}: {str(path)!r} is the {what} {str(inp)!r}; writing it would destroy "
                                f"the input (choose another {flag})")
            if src.is_dir() and src.resolve() in path.resolve().parents:
                raise BakeError(f"{flag}: {str(path)!r} lies inside the {what} {str(inp)!r}; writing there "
                                f"would change the input (choose another {flag})")
    if out.exists() and not force:
        raise BakeError(f"{flag}: {str(out)!r} exists (pass --force to replace it)")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_stale(out: Path, log=print) -> None:
    """Remove the staging directories that dead processes left beside `out`, and put back an old output
    that a run killed between its two renames left hidden."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(bake|old)-(\d+)(-.*)?$")
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.replace(p, out)
            log(f"bake: restored {out} from {p.name} (an earlier run was stopped while replacing it)")
            continue
        shutil.rmtree(p, ignore_errors=True)
        log(f"bake: removed {p.name}, left by an interrupted run (process {m.group(2)} has ended)")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished staging directory at `out`, replacing what is there without ever hiding it."""
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def _no_space(e: BaseException) -> bool:
    """ENOSPC, as an OSError or wrapped by a writer (safetensors reports `IoError(Os { code: 28 … })`)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def _publishable(tmp: Path) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is not
    for f in tmp.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


@contextlib.contextmanager
def staged(out: Path, force: bool, log=print):
    """Yield a staging dir beside `out`; on success it replaces `out`, on any failure (an interrupt too)
    it vanishes. A full disk is bad input: one line, exit 2."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.bake-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _publishable(tmp)
        if out.exists() and any(out.iterdir()) and not force:
            raise BakeError(f"--out: {str(out)!r} appeared meanwhile and is not empty")
        _replace(tmp, out)
    except Exception as e:
        if _no_space(e):
            raise BakeError(f"--out: no space left on the device while writing {out}; nothing was written "
                            f"(the partial output was removed)") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
