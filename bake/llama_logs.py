"""llama.cpp's log lines (its loader and quantizer print from C to fds 1 and 2; llama-cpp-python's logger
to sys.stderr) kept out of the user's output unless BAKE_VERBOSE=1. Used by the GGUF exporter (the
quantizer) and the llama.cpp runtime (loading, freeing)."""

from __future__ import annotations

import contextlib
import os
import sys


def verbose() -> bool:
    return os.environ.get("BAKE_VERBOSE") == "1"


def silence() -> None:
    """llama-cpp-python's log callback prints llama.cpp's info lines (a context's buffers when it is
    freed, ...) to sys.stderr unless its logger is at ERROR: set it so, unless BAKE_VERBOSE=1."""
    import logging

    if not verbose():
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet():
    """llama.cpp's own log lines (its loader and quantizer print to fds 1 and 2 from C) kept out of the
    user's output, unless BAKE_VERBOSE=1."""
    if verbose():
        yield
        return
    silence()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        with open(os.devnull, "wb") as null:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(null.fileno(), fd)
                except OSError:  # no such fd (a daemon): nothing to silence
                    pass
            # llama-cpp-python's log callback prints to sys.stderr, which may not be fd 2
            with open(os.devnull, "w") as text, contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
