"""Decode speed of steered GGUFs in llama.cpp vs the original GGUF, and vs PyTorch (original, hooked,
baked), side by side in one process on the embedded model (SmolLM2-135M-Instruct).

llama.cpp (llama-cpp-python, `--threads` threads), all at `--gguf-type` (default q4_k_m):
- original: the unsteered model, written and quantized the way bake writes the steered one;
- baked projection (`examples/detox.json`): the same graph as the original, new weights (target: ratio
  ≤ 1.02 against the original);
- baked with biases (`examples/detox_mean_act.json`): the graph gains bias adds;
- LoRA (detox.json as `--format lora`, on the original at scale 1) and control vector
  (`examples/detox_caa.json` as `--format control-vector`, scale 1): steering applied at run time.

PyTorch (float32): the original, the hooked reference (detox.json) and the baked checkpoint.

Each variant greedily decodes `--tokens` tokens after a short chat prompt; the variants of one
runtime run interleaved (benchmarks/timing.py), medians over `--repeats` rounds, tokens/s and the
ratio to the original of that runtime. Writes benchmarks/results/gguf_speed.json.

    python benchmarks/gguf_speed.py [--gguf-type q4_k_m] [--tokens 64] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import interleaved_medians_ms  # noqa: E402

from bake.cli import main as bake  # noqa: E402
from bake.exporters import gguf_lm  # noqa: E402
from bake.families import adapter_for  # noqa: E402
from bake.models import load  # noqa: E402
from bake.runtime import steered  # noqa: E402
from bake.spec import read  # noqa: E402

PROMPT = "Write one sentence about the sea."


def build(tmp: Path, kind: str) -> dict[str, Path]:
    """The GGUFs and adapters the llama.cpp variants run (bake apply, no verify: speed only)."""
    loaded = load("llama")
    out = {"original": tmp / "original"}
    out["original"].mkdir()
    shutil.copy(loaded.source / "config.json", out["original"] / "config.json")
    gguf_lm.write(loaded.source, loaded.source, out["original"], kind, adapter_for(loaded.model), log=lambda *_: None)
    jobs = {"baked_projection": ("detox.json", ["--format", "gguf", "--gguf-type", kind]),
            "baked_biases": ("detox_mean_act.json", ["--format", "gguf", "--gguf-type", kind]),
            "lora": ("detox.json", ["--format", "lora"]),
            "control_vector": ("detox_caa.json", ["--format", "control-vector"])}
    for name, (spec, fmt) in jobs.items():
        out[name] = tmp / name
        code = bake(["apply", "--model", "llama", "--spec", str(ROOT / "examples" / spec), "--out", str(out[name]),
                     "--no-verify", *fmt])
        if code != 0:
            raise SystemExit(f"bake apply failed for {name}")
    return out


def llama_cpp_variants(paths: dict[str, Path], threads: int):
    """name → a llama_cpp.Llama on the right GGUF with its run-time adapter, if any."""
    from llama_cpp import Llama

    from bake.llamacpp import apply_control_vector, gguf_in

    def make(gguf: Path, **kw):
        return Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, verbose=False, seed=0, **kw)

    base = gguf_in(paths["original"])
    llms = {"original": make(base), "baked_projection": make(gguf_in(paths["baked_projection"])),
            "baked_biases": make(gguf_in(paths["baked_biases"])),
            "lora": make(base, lora_path=str(paths["lora"] / "lora" / "adapter-F32.gguf"), lora_scale=1.0),
            "control_vector": make(base)}
    apply_control_vector(llms["control_vector"], paths["control_vector"] / "control-vector.gguf", 1.0)
    return llms


def llama_cpp_decode(llm, ids: list[int], n: int):
    def run():
        llm.reset()
        for i, _ in zip(range(n), llm.generate(ids, temp=0.0, reset=True)):
            pass
    return run


def torch_decode(model, ids: torch.Tensor, n: int, specs=None):
    def run():
        with torch.no_grad():
            if specs is None:
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            else:
                with steered(model, specs):
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-type", default="q4_k_m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), a.gguf_type)
        loaded = load("llama")
        tok = loaded.tokenizer
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        llms = llama_cpp_variants(paths, a.threads)
        fns = {f"llama.cpp {k}": llama_cpp_decode(v, ids[0].tolist(), a.tokens) for k, v in llms.items()}
        baked = AutoModelForCausalLM.from_pretrained(str(paths["baked_projection"]), dtype=torch.float32).eval()
        spec = read(ROOT / "examples" / "detox.json")
        fns.update({"pytorch original": torch_decode(loaded.model, ids, a.tokens),
                    "pytorch hooked": torch_decode(loaded.model, ids, a.tokens, [spec]),
                    "pytorch baked_projection": torch_decode(baked, ids, a.tokens)})
        ms = interleaved_medians_ms(fns, a.repeats, group=lambda k: k.split()[0])
    rows = {}
    for k, v in ms.items():
        runtime = k.split()[0]
        rows[k] = {"ms": round(v, 2), "tokens_per_s": round(a.tokens / v * 1000, 1),
                   "ratio_to_original": round(v / ms[f"{runtime} original"], 3)}
        print(f"{k:32s} {rows[k]['tokens_per_s']:8.1f} tok/s   × {rows[k]['ratio_to_original']:.3f}")
    result = {"gguf_type": a.gguf_type, "tokens": a.tokens, "repeats": a.repeats, "threads": a.threads,
              "machine": f"{platform.machine()}, {a.threads} threads", "rows": rows,
              "command": "python benchmarks/gguf_speed.py " + " ".join(sys.argv[1:])}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
