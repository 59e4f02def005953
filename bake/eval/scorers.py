"""Offline toxicity scorers from PyPI packages: a score in [0, 1] per text."""

from __future__ import annotations

from typing import Callable

from ..errors import BakeError

SCORERS = {"profanity": "alt-profanity-check"}


def load_scorer(name: str) -> Callable[[list[str]], list[float]]:
    if name not in SCORERS:
        raise BakeError(f"--scorer: unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise BakeError(f"--scorer {name}: needs the package {SCORERS[name]}; install it with: "
                        f"pip install {SCORERS[name]}  (or: pip install 'bake-steering[eval]')") from None

    def score(texts: list[str]) -> list[float]:
        return [float(p) for p in predict_prob(list(texts))] if texts else []

    return score
