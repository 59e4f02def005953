"""Streaming bake of a checkpoint with Llama-2-7B shapes: peak memory and time next to copying the
checkpoint files, measured in one run. Writes benchmarks/results/stream_7b.json.

A synthetic sharded Llama checkpoint (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000;
random bf16 weights: slices of one random pool, about 13.5 GB in ~2 GB shards) is written once to a temp dir; the spec puts an
affine map (scale and shift) at both norms of every layer (64 sites: scales into the norm weights,
shifts into new q/k/v and gate/up biases, so every layer's projections are read and every shard
holding a norm is rewritten). A second spec scales the same sites without shifts (norm weights only). Each bake runs
as `bake apply --stream --no-verify` in a child process (peak RSS measured by GNU time); the copy is
`shutil.copytree` of the same directory. Copy and bakes are interleaved over --rounds rounds and
medians reported; before each one dirty pages are written back (sync) and, where the process may
(root on Linux), the page cache is dropped, so every job starts cold: a copy right after the
checkpoint was written, or a second copy of a cached one, would otherwise time the cache, not the disk.
Targets (issue 8): peak RSS <= 2 GB, bake time <= 1.5x copy time.

    python benchmarks/stream_7b.py [--layers 32] [--dir /tmp] [--keep] [--ckpt DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bake.exporters.shards import write_shard
from bake.maps import Map
from bake.spec import Spec, write

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3


def llama_7b_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "dtype": "bfloat16", "rope_theta": 10000.0}


def tensors(cfg: dict):
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        for x in "qkvo":
            yield f"{p}.self_attn.{x}_proj.weight", (h, h)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate_proj.weight", (m, h)
        yield f"{p}.mlp.up_proj.weight", (m, h)
        yield f"{p}.mlp.down_proj.weight", (h, m)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def make_checkpoint(folder: Path, cfg: dict) -> int:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(0)
    pool = (0.02 * torch.randn(2**27, generator=g)).to(torch.bfloat16)  # slices of one pool: fast to make
    shard, size, n, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n, total
        name = f"model-{n:05d}.safetensors"
        total += write_shard(folder / name, list(shard), shard)
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shape in tensors(cfg):
        if len(shape) == 1:
            t = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            numel = shape[0] * shape[1]
            off = int(torch.randint(0, pool.numel(), (1,), generator=g))
            rolled = torch.cat([pool[off:], pool[:off]])
            t = rolled.repeat(-(-numel // rolled.numel()))[:numel].reshape(shape).clone()
        shard[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", default=None, help="where to write the temp checkpoint (needs 3x its size)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (and the synthetic checkpoint in it)")
    ap.add_argument("--ckpt", default=None, help="reuse a synthetic checkpoint made by an earlier --keep run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_7b.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bake-stream-", dir=a.dir))
    try:
        cfg = llama_7b_config(a.layers)
        t = time.perf_counter()
        if a.ckpt:
            (work / "ckpt").symlink_to(Path(a.ckpt).resolve())
            total = json.loads((work / "ckpt" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            total = make_checkpoint(work / "ckpt", cfg)
        print(f"checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
        h = cfg["hidden_size"]
        g = torch.Generator().manual_seed(1)
        norms = [(i, n) for i in range(a.layers) for n in ("input_layernorm", "post_attention_layernorm")]
        specs = {  # shifts: every layer's q/k/v and gate/up weights are read for W b; scales: norm weights only
            "affine_at_norms": Spec([(f"model.layers.{i}.{n}:output", [Map("affine", 1.0, {
                "a": 1 + 0.1 * torch.randn(h, generator=g), "b": 0.1 * torch.randn(h, generator=g)})])
                for i, n in norms], method="benchmark"),
            "scale_at_norms": Spec([(f"model.layers.{i}.{n}:output", [Map("affine", 1.0, {
                "a": 1 + 0.1 * torch.randn(h, generator=g), "b": torch.zeros(h)})]) for i, n in norms],
                method="benchmark"),
        }

        def cold() -> bool:
            os.sync()
            try:
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
                return True
            except OSError:
                return False

        def copy(dst: str) -> float:
            t = time.perf_counter()
            shutil.copytree(work / "ckpt", work / dst)
            os.sync()  # the copy is done when its bytes are on disk (as for the bakes, below)
            s = time.perf_counter() - t
            shutil.rmtree(work / dst)
            return s

        def bake(name: str) -> dict:
            write(specs[name], work / f"{name}.json")
            t = time.perf_counter()
            # GNU time reports the bake's own peak RSS (a forked child would otherwise be charged this
            # process's pages until it execs)
            proc = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb=%M", sys.executable, "-m", "bake", "apply",
                                   "--model", str(work / "ckpt"), "--spec", str(work / f"{name}.json"), "--out",
                                   str(work / name), "--stream", "--no-verify", "--ignore-fingerprint"],  # synthetic weights
                                  capture_output=True, text=True)
            os.sync()
            s = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            report = json.loads((work / name / "bake_report.json").read_text())
            shutil.rmtree(work / name)
            return {"seconds": round(s, 1),
                    "peak_rss_gb": round(int(proc.stderr.rsplit("peak_rss_kb=", 1)[1].split()[0]) / 1024**2, 2),
                    "shards": next((p["did"] for p in report["passes"] if p["pass"] == "stream"), ""),
                    "config_changes": report["config_changes"]}

        copies, runs, was_cold = [], {name: [] for name in specs}, []
        for r in range(a.rounds):
            was_cold.append(cold())
            copies.append(copy(f"copy{r}"))
            for name in specs:
                was_cold.append(cold())
                runs[name].append(bake(name))
            print(f"round {r + 1}: copy {copies[-1]:.1f} s, " + ", ".join(
                f"{n} {v[-1]['seconds']} s" for n, v in runs.items()), flush=True)
        copy_s = statistics.median(copies)
        bakes = {name: {**v[-1], "seconds": statistics.median(x["seconds"] for x in v), "runs_s": [x["seconds"] for x in v],
                        "peak_rss_gb": max(x["peak_rss_gb"] for x in v)} for name, v in runs.items()}
        shards = len(set(json.loads((work / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"].values()))
        result = {
            "checkpoint": f"synthetic Llama, 7B shapes ({a.layers} layers), bf16, {total / 1e9:.2f} GB, {shards} shards",
            "specs": {"affine_at_norms": f"affine (scale + shift) at both norms of every layer: {len(norms)} sites",
                      "scale_at_norms": f"scale only at the same {len(norms)} sites"},
            "copy_s": [round(c, 1) for c in copies],
            "page_cache": "dropped before each job" if all(was_cold) else "warm (could not drop it)",
            "bakes": bakes,
            "bake_over_copy": {k: round(v["seconds"] / copy_s, 2) for k, v in bakes.items()},
            "targets": {"peak_rss_gb_max": 2.0, "bake_over_copy_max": 1.5},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))
    finally:
        if a.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
