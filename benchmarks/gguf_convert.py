"""A transformers directory → steered GGUF through llama.cpp's own converter, per architecture, on the real
packaged models (SmolLM2-135M: llama, Qwen2.5-Coder-0.5B: qwen2, Gemma-3-270M: gemma3), against what a
user would run without bake: llama.cpp's `convert_hf_to_gguf.py` and its quantizer on the unsteered model.

Per model (its cached float32 directory, copied without bake_source.json so that bake takes the
converter's path; the safetensors hard-linked):
- `bake apply --format gguf --gguf-type T --no-verify` of a random spec that folds into weights alone
  (a rank-1 projection at every attention and MLP write, λ = 0.8; a per-unit scale at every MLP's hidden
  units): wall time and peak RSS (`/usr/bin/time -v`), in its own process;
- llama.cpp's own: `python convert_hf_to_gguf.py DIR --outtype f32` then `llama_model_quantize` to T
  (llama-cpp-python; what `llama-quantize` calls), each in its own process: summed wall, max peak RSS;
- decode tokens/s in llama.cpp of the steered GGUF and of llama.cpp's own unsteered one (the same graph:
  target ratio ≤ 1.02), interleaved, medians over `--repeats` (benchmarks/timing.py).

`--stream-layers N` (0: skip) also measures a streamed bake to GGUF: a synthetic Llama checkpoint with
Llama-2-7B widths and N layers (random bf16, SmolLM2's tokenizer, benchmarks/stream_7b.py's maker), a
shift and scale at both norms of every layer (new q/k/v and gate/up biases, which llama.cpp's llama
loader reads), `bake apply --stream --format gguf --gguf-type q8_0 --no-verify`: wall time and peak RSS
against the checkpoint's size.

Writes benchmarks/results/gguf_convert.json.

    python benchmarks/gguf_convert.py [--models llama,qwen,gemma3] [--gguf-type q4_k_m] [--tokens 64] [--repeats 5]
                                      [--stream-layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from timing import interleaved_medians_ms  # noqa: E402

PROMPT = "Write one sentence about the sea."


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process, from GNU time."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1e6
    return secs, rss


def directory(alias: str, tmp: Path) -> Path:
    """The alias's cached float32 directory, without bake_source.json (safetensors hard-linked)."""
    from bake.models import resolve

    src, out = resolve(alias), tmp / alias
    out.mkdir()
    for f in Path(src).iterdir():
        if f.name == "bake_source.json" or not f.is_file():
            continue
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, out / f.name)
    return out


def weights_spec(model_dir: Path, path: Path) -> Path:
    """A random spec that folds into weights alone (no bias: every architecture holds it)."""
    from bake.models import load
    from bake.spec import write
    from bake.support_table import weights_only_spec

    write(weights_only_spec(load(str(model_dir)).model, seed=0, scale_sd=0.1), path)
    return path


def llama_cpp_own(model_dir: Path, out: Path, kind: str) -> tuple[float, float, Path]:
    """llama.cpp's convert_hf_to_gguf.py (f32) then its quantizer, each in its own process."""
    from bake.exporters import gguf_convert, gguf_lm

    f32, q = out / "own-F32.gguf", out / f"own-{kind.upper()}.gguf"
    env_py = [sys.executable]
    t1, r1 = timed([*env_py, str(gguf_convert.home() / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                    "--outfile", str(f32)])
    quant = ("import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
             f"p.ftype = {gguf_lm.TYPES[kind]}; p.nthread = 0; "
             "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    t2, r2 = timed([*env_py, "-c", quant, str(f32), str(q)])
    f32.unlink()
    return t1 + t2, max(r1, r2), q


def decode(gguf: Path, ids: list[int], n: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, verbose=False, seed=0)

    def run():
        llm.reset()
        for _, _ in zip(range(n), llm.generate(ids, temp=0.0, reset=True)):
            pass
    return run


def one(alias: str, tmp: Path, a) -> dict:
    from transformers import AutoTokenizer

    d = directory(alias, tmp)
    spec = weights_spec(d, tmp / f"{alias}.json")
    out = tmp / f"{alias}-baked"
    bake_s, bake_gb = timed([sys.executable, "-m", "bake", "apply", "--model", str(d), "--spec", str(spec), "--format",
                             "gguf", "--gguf-type", a.gguf_type, "--no-verify", "--out", str(out)])
    own_dir = tmp / f"{alias}-own"
    own_dir.mkdir()
    own_s, own_gb, own = llama_cpp_own(d, own_dir, a.gguf_type)
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("The sea is")["input_ids"]
    steered = next(out.glob("model-*.gguf"))
    ms = interleaved_medians_ms({"original": decode(own, ids, a.tokens, a.threads),
                                 "steered": decode(steered, ids, a.tokens, a.threads)}, a.repeats)
    row = {"bake_apply_s": round(bake_s, 1), "bake_peak_rss_gb": round(bake_gb, 2),
           "llama_cpp_convert_quantize_s": round(own_s, 1), "llama_cpp_peak_rss_gb": round(own_gb, 2),
           "time_ratio": round(bake_s / own_s, 2),
           "tokens_per_s_original": round(a.tokens / ms["original"] * 1000, 1),
           "tokens_per_s_steered": round(a.tokens / ms["steered"] * 1000, 1),
           "decode_time_ratio": round(ms["steered"] / ms["original"], 3)}
    print(alias, row, flush=True)
    shutil.rmtree(out)
    shutil.rmtree(own_dir)
    return row


def stream_memory(layers: int, tmp: Path) -> dict:
    """A streamed bake of a synthetic 7B-wide checkpoint straight to a q8_0 GGUF: seconds and peak RSS."""
    from stream_7b import llama_7b_config, make_checkpoint
    from transformers import AutoTokenizer

    from bake.maps import Map
    from bake.models import resolve
    from bake.spec import Spec, write

    tok = AutoTokenizer.from_pretrained(str(resolve("llama")))
    cfg = {**llama_7b_config(layers), "vocab_size": len(tok)}
    ckpt = tmp / "synthetic"
    total = make_checkpoint(ckpt, cfg)
    tok.save_pretrained(str(ckpt))
    doc = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**doc, "tokenizer_class": "PreTrainedTokenizerFast"}))
    g, h = torch.Generator().manual_seed(1), cfg["hidden_size"]
    write(Spec([(f"model.layers.{i}.{n}:output", [Map("affine", 1.0, {
        "a": 1 + 0.1 * torch.randn(h, generator=g), "b": 0.1 * torch.randn(h, generator=g)})])
        for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")], method="benchmark"),
        tmp / "norms.json")
    secs, rss = timed([sys.executable, "-m", "bake", "apply", "--model", str(ckpt), "--spec", str(tmp / "norms.json"),
                       "--stream", "--format", "gguf", "--gguf-type", "q8_0", "--no-verify", "--ignore-fingerprint",
                       "--out", str(tmp / "streamed")])
    size = sum(f.stat().st_size for f in (tmp / "streamed").glob("model-*.gguf"))
    row = {"layers": layers, "checkpoint_gb": round(total / 1e9, 2), "gguf_q8_0_gb": round(size / 1e9, 2),
           "seconds": round(secs, 1), "peak_rss_gb": round(rss, 2)}
    print("stream", row, flush=True)
    shutil.rmtree(tmp / "streamed")
    shutil.rmtree(ckpt)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,qwen,gemma3")
    ap.add_argument("--gguf-type", default="q4_k_m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--stream-layers", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_convert.json"))
    a = ap.parse_args()
    rows, stream = {}, None
    with tempfile.TemporaryDirectory(dir=os.environ.get("BAKE_BENCH_TMP")) as tmp:
        for alias in filter(None, a.models.split(",")):
            rows[alias] = one(alias, Path(tmp), a)
        if a.stream_layers:
            stream = stream_memory(a.stream_layers, Path(tmp))
    result = {"gguf_type": a.gguf_type, "tokens": a.tokens, "repeats": a.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads", "rows": rows,
              "stream": stream,
              "command": "python benchmarks/gguf_convert.py " + " ".join(sys.argv[1:])}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
