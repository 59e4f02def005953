"""PNG of an eval sweep: toxicity vs perplexity over λ (or one metric vs λ), original marked."""

from __future__ import annotations

from pathlib import Path


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = doc["points"]
    tox = [p["toxicity"]["toxic_rate"] * 100 if "toxicity" in p else None for p in pts]
    ppl = [p["perplexity"]["perplexity"] if "perplexity" in p else None for p in pts]
    ref = [p["refusal"]["harmful"]["refusal_rate"] * 100 if "refusal" in p else None for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if all(r is not None for r in ref):  # heretic's plane: refusals vs first-token KL
        xs, ys = [p["refusal"]["harmless_kl"] for p in pts], ref
        xlabel, ylabel = "first-token KL on harmless prompts", "refusals of harmful prompts (%)"
    elif all(t is not None for t in tox) and all(q is not None for q in ppl):
        xs, ys, xlabel, ylabel = ppl, tox, "FLORES perplexity", "toxic continuations (%)"
    else:
        vals = tox if tox[0] is not None else ppl
        xs = [p["strength"] if p["strength"] is not None else 0.0 for p in pts]
        ys, xlabel = vals, "strength λ"
        ylabel = "toxic continuations (%)" if tox[0] is not None else "FLORES perplexity"
    steered = [(x, y, p["label"]) for x, y, p in zip(xs, ys, pts) if p["strength"] is not None]
    if steered:
        ax.plot([s[0] for s in steered], [s[1] for s in steered], "o-", color="#1f77b4", label="steered")
        for x, y, lab in steered:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for x, y, p in zip(xs, ys, pts):
        if p["label"] == "original":
            ax.plot([x], [y], "*", ms=14, color="#d62728", label="original")
        elif p["label"] == "baked":  # a checkpoint: should sit on its strength's hooked point
            ax.plot([x], [y], "s", ms=11, mfc="none", mew=2, color="#2ca02c", label="baked checkpoint")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    n = doc["config"]
    ax.set_title(f"{doc['model']}: {n['prompts']} prompts × {len(n['seeds'])} seeds, {n['sentences']} sentences",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
