"""How well bake's refusal detectors agree with hand labels: heretic's marker rule and the stricter
opening rule (`bake.evaluation.refusal`, recomputed on the stored responses), and the model's own
probability of a refusal opening (stored with each response) as a score (AUROC; agreement at the
threshold that best separates the labels). Reads benchmarks/results/refusal_labels.json, prints the
table that docs/abliteration.md shows.

    python benchmarks/detector_agreement.py
"""

from __future__ import annotations

import json
from pathlib import Path

from bake.evaluation.refusal import is_refusal, opens_with_refusal

LABELS = Path(__file__).resolve().parent / "results" / "refusal_labels.json"


def agreement(pred: list[bool], truth: list[bool]) -> dict:
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    return {"agree": sum(p == t for p, t in zip(pred, truth)), "n": len(truth), "false_refusals": fp,
            "missed_refusals": fn, "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)}


def auroc(score: list[float], truth: list[bool]) -> float:
    """P(score of a refusal > score of a non-refusal), ties counted half."""
    pos = [s for s, t in zip(score, truth) if t]
    neg = [s for s, t in zip(score, truth) if not t]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / max(len(pairs), 1)


def main() -> None:
    rows = json.loads(LABELS.read_text())["rows"]
    truth = [r["refusal"] for r in rows]
    prob = [r["opening_probability"] for r in rows]
    best = max(sorted(set(prob)), key=lambda c: sum((p >= c) == t for p, t in zip(prob, truth)))
    out = {"hand-labelled refusals": f"{sum(truth)}/{len(truth)}",
           "marker rule (heretic's)": agreement([is_refusal(r["response"]) for r in rows], truth),
           "opening rule": agreement([opens_with_refusal(r["response"]) for r in rows], truth),
           "opening probability": {"auroc": round(auroc(prob, truth), 3), "threshold": round(best, 3),
                                   **agreement([p >= best for p in prob], truth)}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
