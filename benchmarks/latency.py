"""Latency of original vs hooked vs baked on the embedded model, plus fit and apply time.

64-token prefill and 32-token greedy decode, all variants interleaved in one process (round-robin,
rotating order), medians and ratios. Two specs: the detox example (its shifts need the
attention_bias/mlp_bias flags, so the baked graph gains bias adds) and a rank-1 projection at
every o_proj and down_proj output (direction ablation: folds into weights only, same graph as the
original). Writes benchmarks/results/latency.json.

    python benchmarks/latency.py [--model llama] [--spec examples/detox_mean_act.json] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bake import compiler
from bake.compiler import read_specs
from bake.fit import fit, read_texts
from bake.maps import Map
from bake.families import adapter_for
from bake.models import load
from bake.runtime import steered
from bake.spec import Spec, write

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def projection_spec(model, path: Path) -> Path:
    """A rank-1 projection (direction-ablation shape) at every attention and MLP output."""
    ad = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(model.config.hidden_size, 1, generator=g)
    u = u / u.norm()
    sites = [(n, [Map("projection", 1.0, {"U": u})]) for n in ad.resolve(model, ["attn-out", "mlp-out"])]
    return write(Spec(sites, method="benchmark-projection"), path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "detox_mean_act.json"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results: dict = {"model": a.model, "spec": Path(a.spec).name, "threads": a.threads,
                     "torch": torch.__version__, "machine": platform.machine(), "repeats": a.repeats}

    # fit time: mean-act and linear-act, post-norms, 32 + 32 sentences, causal (the default)
    loaded = load(a.model)
    data = ROOT / "examples" / "data"
    src = read_texts(data / "toxigen_toxic.txt", "src")[:32]
    tgt = read_texts(data / "toxigen_benign.txt", "tgt")[:32]
    for method in ("mean-act", "linear-act"):
        t = time.perf_counter()
        fit(loaded.model, loaded.tokenizer, src, tgt, method, ["post-norms"])
        results[f"fit_{method}_post_norms_32x32_s"] = time.perf_counter() - t
    del loaded

    with tempfile.TemporaryDirectory() as tmp:
        proj = projection_spec(load(a.model).model, Path(tmp) / "ablate.json")
        t = time.perf_counter()
        compiler.apply(a.model, [a.spec], Path(tmp) / "nv", run_verify=False, log=lambda *_: None)
        results["apply_no_verify_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = compiler.apply(a.model, [a.spec], Path(tmp) / "baked", log=lambda *_: None)
        results["apply_with_verify_s"] = time.perf_counter() - t
        results["verify_max_rel"] = res.verification["max_rel"]

        compiler.apply(a.model, [str(proj)], Path(tmp) / "baked_proj", run_verify=False, log=lambda *_: None)

        original = load(a.model).model
        hooked = load(a.model).model
        hooked_proj = load(a.model).model
        baked = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "baked")).eval()
        baked_proj = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "baked_proj")).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 20000, (1, 64), generator=g)
        short = ids[:, :16]

        def prefill(m):
            with torch.no_grad():
                m(ids)

        def decode(m):
            with torch.no_grad():
                m.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)

        variants = {"original": original, "hooked": hooked, "baked": baked, "hooked_proj": hooked_proj,
                    "baked_proj": baked_proj}
        times = {f"{v}_{k}": [] for v in variants for k in ("prefill", "decode")}
        with steered(hooked, read_specs([a.spec])), steered(hooked_proj, read_specs([str(proj)])):
            for m in variants.values():  # warm-up
                prefill(m)
                decode(m)
            names = list(variants)
            for r in range(a.repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for v in order:
                    times[f"{v}_prefill"].append(timed(lambda: prefill(variants[v])))
                    times[f"{v}_decode"].append(timed(lambda: decode(variants[v])))
    med = {k: statistics.median(v) for k, v in times.items()}
    results["median_s"] = med
    for k in ("prefill", "decode"):
        for v in variants:
            if v != "original":
                results[f"{k}_{v}_over_original"] = med[f"{v}_{k}"] / med[f"original_{k}"]
    results["decode_ms_per_token"] = {v: 1000 * med[f"{v}_decode"] / 32 for v in variants}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, Path(a.out).with_suffix(".png"))
    print(json.dumps(results, indent=1))


def plot(results: dict, path: Path) -> None:
    """Bar chart of per-token decode and 64-token prefill latency per variant (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    med = results["median_s"]
    names = ["original", "hooked", "baked", "hooked_proj", "baked_proj"]
    labels = ["original", "hooked\n(detox)", "baked\n(detox)", "hooked\n(ablation)", "baked\n(ablation)"]
    colors = ["#777777", "#d62728", "#2ca02c", "#ff9896", "#98df8a"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, scale, unit in ((axes[0], "decode", 1000 / 32, "ms per decoded token"),
                                 (axes[1], "prefill", 1000, "ms per 64-token prefill")):
        vals = [med[f"{n}_{key}"] * scale for n in names]
        ax.bar(labels, vals, color=colors)
        ax.axhline(vals[0], color="black", lw=0.8, ls="--")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v / vals[0]:.3f}×", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{results['model']}: original vs hooked vs baked ({results['threads']} CPU threads, "
                 f"median of {results['repeats']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
