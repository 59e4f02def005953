"""Overhead of inserted modules: a DSAS-gated bake vs the same inner map folded (ungated, stock),
per decode step with a 64-token KV cache and for a 64-token prefill, in PyTorch eager and ONNX
Runtime (CPU), interleaved in one process (PyTorch and ORT, decode and prefill in separate blocks; the two ORT sessions
with thread spinning off, so neither runs beside the other's idle threads), medians and ratios. Writes
benchmarks/results/inserted_overhead.json.

    python benchmarks/inserted_overhead.py [--model llama] [--inner examples/detox_mean_act.json] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bake import compiler
from bake.fit import fit, read_texts
from bake.models import load
from bake.ort import OrtCausalLM
from timing import by_runtime, interleaved_medians_ms
from bake.spec import write

ROOT = Path(__file__).resolve().parents[1]


def by_runtime_and_phase(name: str) -> str:
    """Decode and prefill timed in separate blocks too: interleaved in one round, the gated decode always
    followed a prefill (of either model) and the ungated one only on alternate rounds, and a decode step
    right after a 64-token prefill runs slower (measured 1.12-1.15x gated/ungated that way, 1.0-1.06x
    with a profiler on isolated steps)."""
    return f"{by_runtime(name)}_{'decode' if 'decode' in name else 'prefill'}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--inner", default=str(ROOT / "examples" / "detox_mean_act.json"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inserted_overhead.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = ROOT / "examples" / "data"
    res: dict = {"model": a.model, "inner": Path(a.inner).name, "threads": a.threads, "torch": torch.__version__,
                 "machine": platform.machine(), "repeats": a.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load(a.model)
        t = time.perf_counter()
        spec = fit(loaded.model, loaded.tokenizer, read_texts(data / "selflabel_toxic.txt", "s")[:64],
                   read_texts(data / "selflabel_benign.txt", "t")[:64], "dsas", strength=1.0,
                   control=read_texts(data / "selflabel_benign.txt", "c")[64:128], inner=a.inner, min_accuracy=0.5)
        res["dsas_fit_s"] = round(time.perf_counter() - t, 1)
        res["gated_sites"] = len(spec.sites)
        del loaded
        write(spec, tmp / "gated.json")
        outs = {"ungated": tmp / "ungated", "gated": tmp / "gated"}
        compiler.apply(a.model, [a.inner], outs["ungated"], formats=["safetensors", "onnx"], run_verify=False,
                      log=lambda *_: None)
        compiler.apply(a.model, [str(tmp / "gated.json")], outs["gated"], formats=["safetensors", "onnx"],
                      run_verify=False, insert_modules=True, log=lambda *_: None)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49152, (1, 64), generator=g)
        nxt = torch.randint(0, 49152, (1, 1), generator=g)
        m64, m65 = torch.ones(1, 64, dtype=torch.long), torch.ones(1, 65, dtype=torch.long)
        fns = {}
        for name, path in outs.items():
            pt = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=(name == "gated")).eval()
            res.setdefault("pytorch_class", {})[name] = (type(pt).__name__, pt.config._attn_implementation)
            with torch.no_grad():
                past = [(lay.keys.clone(), lay.values.clone())
                        for lay in pt(ids, attention_mask=m64, use_cache=True).past_key_values.layers]
            om = OrtCausalLM(path, "cpu", threads=a.threads, spin=False)  # two sessions: no spinning
            _, opast = om.step(ids.numpy(), m64.numpy(), om.empty_past(1))

            def pt_decode(pt=pt, past=past):
                cache = DynamicCache(config=pt.config)
                for i, (k, v) in enumerate(past):
                    cache.update(k, v, i)
                with torch.no_grad():
                    pt(nxt, attention_mask=m65, past_key_values=cache, use_cache=True)

            def pt_prefill(pt=pt):
                with torch.no_grad():
                    pt(ids, attention_mask=m64)

            fns[f"pytorch_decode_{name}"] = pt_decode
            fns[f"pytorch_prefill_{name}"] = pt_prefill
            fns[f"ort_decode_{name}"] = lambda om=om, opast=opast: om.step(nxt.numpy(), m65.numpy(), opast)
            fns[f"ort_prefill_{name}"] = lambda om=om: om.step(ids.numpy(), m64.numpy(), om.empty_past(1))
        med = interleaved_medians_ms(fns, a.repeats, group=by_runtime_and_phase)
        res["median_ms"] = {k: round(v, 2) for k, v in med.items()}
        res["gated_over_ungated"] = {k: round(med[f"{k}_gated"] / med[f"{k}_ungated"], 3)
                                     for k in ("pytorch_decode", "pytorch_prefill", "ort_decode", "ort_prefill")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
