"""The heretic head-to-head pooled over seeds: reads every benchmarks/results/abliteration_vs_heretic*.json
(one per `--seed` of benchmarks/abliteration_vs_heretic.py) and writes
benchmarks/results/abliteration_vs_heretic_seeds.json and docs/abliteration-vs-heretic-seeds.png.

    python benchmarks/heretic_seeds.py [--max-kl 0.05]

Per seed, on the held-out split (each tool's select-split Pareto front, scored by one evaluator):
- the chosen point of each tool by one rule (bake search's: fewest select-split refusals among front
  points with select KL ≤ --max-kl, the lowest KL when none is), and its held-out refusals and KL;
- the hypervolume of each front: the area of (refusal rate, KL) space it dominates inside the box
  [0, original refusal rate] × [0, --max-kl] (larger is better; a front that dominates another has at
  least its hypervolume);
- whether one front dominates the other (every point of the other is matched or beaten on both).
Pooled per trial budget: the chosen points' mean refusals and KL, and the seeds each tool wins on
hypervolume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def chosen(select: list[dict], max_kl: float) -> int:
    """The trial bake search's rule picks from a select-split front."""
    ok = [r for r in select if r["kl"] <= max_kl]
    return (min(ok, key=lambda r: (r["refusals"], r["kl"])) if ok else min(select, key=lambda r: r["kl"]))["trial"]


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (rate, kl), both minimised, inside [0, ref_rate] × [0, ref_kl]."""
    pts = sorted((min(r, ref[0]), k) for r, k in points if k < ref[1] and r < ref[0])
    area, best_kl = 0.0, ref[1]
    for i, (rate, kl) in enumerate(pts):  # sweep by refusal rate: each step adds a strip
        best_kl = min(best_kl, kl)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (nxt - rate) * (ref[1] - best_kl)
    return area


def dominates(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Every point of b is matched or beaten by some point of a on both objectives."""
    return all(any(ra <= rb and ka <= kb for ra, ka in a) for rb, kb in b)


def per_seed(doc: dict, max_kl: float) -> dict:
    held, n = doc["heldout"], doc["heldout"]["prompts"]
    ref = (held["original"]["refusals"] / n, max_kl)
    out = {"seed": doc["seed"], "trials": doc["trials"], "original_refusals": held["original"]["refusals"],
           "seconds": doc["seconds"], "baked": doc["bake_chosen"]["baked"]}
    fronts = {}
    for tool in ("heretic", "bake"):
        pts = {r["trial"]: r for r in held[tool]}
        pick = chosen(doc["select"][tool], max_kl)
        fronts[tool] = [(r["refusals"] / n, r["kl"]) for r in held[tool]]
        out[tool] = {"chosen": {"trial": pick, **{k: pts[pick][k] for k in ("refusals", "kl", "benign_rate")}},
                     "front": [{"trial": r["trial"], "refusals": r["refusals"], "kl": r["kl"]} for r in held[tool]],
                     "hypervolume": hypervolume(fronts[tool], ref)}
    out["bake_dominates"] = dominates(fronts["bake"], fronts["heretic"])
    out["heretic_dominates"] = dominates(fronts["heretic"], fronts["bake"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-kl", type=float, default=0.05)
    a = ap.parse_args()
    docs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("abliteration_vs_heretic*.json"))
            if p.stem != "abliteration_vs_heretic_seeds"]
    runs = sorted((per_seed(d, a.max_kl) for d in docs), key=lambda s: (s["trials"], s["seed"]))
    pooled = {f"{n} trials": pool([s for s in runs if s["trials"] == n]) for n in sorted({s["trials"] for s in runs})}
    doc = {"max_kl": a.max_kl, "runs": runs, "pooled": pooled}
    (RESULTS / "abliteration_vs_heretic_seeds.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(runs, ROOT / "docs" / "abliteration-vs-heretic-seeds.png")
    print(json.dumps(pooled, indent=1))


def pool(seeds: list[dict]) -> dict:
    """One trial budget's runs pooled: means of the chosen points, and counts of seeds."""
    pooled = {"seeds": [s["seed"] for s in seeds]}
    for tool in ("heretic", "bake"):
        c = [s[tool]["chosen"] for s in seeds]
        pooled[tool] = {"chosen_refusals_mean": sum(x["refusals"] for x in c) / len(c),
                        "chosen_kl_mean": sum(x["kl"] for x in c) / len(c),
                        "hypervolume_mean": sum(s[tool]["hypervolume"] for s in seeds) / len(seeds),
                        "seconds_mean": sum(s["seconds"][tool] for s in seeds) / len(seeds)}
    pooled["bake_higher_hypervolume"] = sum(s["bake"]["hypervolume"] > s["heretic"]["hypervolume"] for s in seeds)
    pooled["bake_dominates"] = sum(s["bake_dominates"] for s in seeds)
    pooled["heretic_dominates"] = sum(s["heretic_dominates"] for s in seeds)
    pooled["bake_chosen_no_worse_on_both"] = sum(
        s["bake"]["chosen"]["refusals"] <= s["heretic"]["chosen"]["refusals"]
        and s["bake"]["chosen"]["kl"] <= s["heretic"]["chosen"]["kl"] for s in seeds)
    return pooled


def plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(3.6 * len(seeds), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], seeds):
        for tool, colour in (("heretic", "tab:orange"), ("bake", "tab:blue")):
            f = sorted(s[tool]["front"], key=lambda r: r["kl"])
            ax.plot([r["kl"] for r in f], [r["refusals"] for r in f], "o-", color=colour, label=tool)
            c = s[tool]["chosen"]
            ax.plot([c["kl"]], [c["refusals"]], "*", ms=13, color=colour)
        ax.axhline(s["original_refusals"], color="grey", ls=":", label="original")
        ax.set_title(f"seed {s['seed']} ({s['trials']} trials each)")
        ax.set_xlabel("first-token KL (held-out)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out refusals of 30 (★ chosen)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
