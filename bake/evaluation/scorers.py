"""Offline toxicity scorers from PyPI packages: a score in [0, 1] per text.

- `profanity`: alt-profanity-check (a linear SVM on word n-grams, calibrated probabilities).
- `hatesonar`: HateSonar (Davidson et al. 2017; the package ships it as ONNX, no pickles); the
  score is P(hate speech) + P(offensive language) = 1 − P(neither).
"""

from __future__ import annotations

from typing import Callable

from ..errors import BakeError

SCORERS = {"profanity": "alt-profanity-check", "hatesonar": "hatesonar"}
# what loading each scorer runs: bake never unpickles, but alt-profanity-check does, on import
PICKLES = {"profanity": "alt-profanity-check unpickles its model (joblib.load) when imported; "
                        "--scorer hatesonar ships ONNX and loads no pickle",
           "hatesonar": None}


def _missing(name: str) -> BakeError:
    return BakeError(f"--scorer {name}: needs the package {SCORERS[name]}; install it with: "
                     f"pip install {SCORERS[name]}  (or: pip install 'bake-steering[eval]')")


def _profanity() -> Callable[[list[str]], list[float]]:
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise _missing("profanity") from None

    def score(texts: list[str]) -> list[float]:
        return [float(p) for p in predict_prob(list(texts))] if texts else []

    return score


def _hatesonar() -> Callable[[list[str]], list[float]]:
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from hatesonar.api import DEFAULT_MODEL_FILE
    except ImportError:
        raise _missing("hatesonar") from None
    model = onnx.load(str(DEFAULT_MODEL_FILE))
    for node in model.graph.node:  # its lower-casing asks for en_US.UTF-8, which slim machines lack
        if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    neither = 2  # classes: 0 hate speech, 1 offensive language, 2 neither

    def score(texts: list[str]) -> list[float]:
        if not texts:
            return []
        _, probs = sess.run(None, {"text": np.array(list(texts), dtype=object)})
        return [float(1.0 - p[neither]) for p in probs]

    return score


def load_scorer(name: str) -> Callable[[list[str]], list[float]]:
    if name not in SCORERS:
        raise BakeError(f"--scorer: unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    return {"profanity": _profanity, "hatesonar": _hatesonar}[name]()


def scorer_names(names: str) -> list[str]:
    """Comma-separated scorer names, in order (the first is the headline one), each a known scorer."""
    parts = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    if not parts:
        raise BakeError("--scorer: give at least one scorer")
    bad = [n for n in parts if n not in SCORERS]
    if bad:
        raise BakeError(f"--scorer: unknown scorer {bad[0]!r} (known: {', '.join(SCORERS)})")
    return parts


def load_scorers(names: str) -> dict[str, Callable[[list[str]], list[float]]]:
    """The scorers `names` (comma-separated) names, loaded, in order."""
    return {n: load_scorer(n) for n in scorer_names(names)}
