"""The two ways bake refuses: bad input (exit 2) and a result that failed its check (exit 1)."""


class BakeError(Exception):
    """Bad input: malformed spec, unknown site, model mismatch, NaN... Exit code 2.

    The message is one line that names the field or the thing at fault.
    """

    exit_code = 2


class CheckFailed(Exception):
    """A compiled model or a diff crossed its threshold. Exit code 1."""

    exit_code = 1


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
