"""ONNX Runtime vs PyTorch eager for the baked embedded model: 64-token prefill and one decode step
with a 64-token KV cache, interleaved in one process (alternating order), medians and ratios; plus
export time and file size. Writes benchmarks/results/onnx_latency.json.

    python benchmarks/onnx_latency.py [--model llama] [--spec examples/detox_mean_direction.json] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bake import compiler
from bake.ort import OrtCausalLM
from timing import by_runtime, interleaved_medians_ms

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "detox.json"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_latency.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict = {"model": a.model, "spec": Path(a.spec).name, "threads": a.threads, "torch": torch.__version__,
                 "onnxruntime": ort.__version__, "machine": platform.machine(), "repeats": a.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baked"
        t = time.perf_counter()
        r = compiler.apply(a.model, [a.spec], out, formats=["safetensors", "onnx"], run_verify=False,
                          log=lambda *_: None)
        res["apply_both_formats_s"] = round(time.perf_counter() - t, 1)
        info = json.loads((out / "onnx_info.json").read_text())
        res["onnx_export_s"] = info["export_seconds"]
        res["onnx_bytes"] = info["bytes"]
        res["safetensors_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        res["config_changes"] = r.config_changes
        pt = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        t = time.perf_counter()
        om = OrtCausalLM(out, a.provider, threads=a.threads)
        res["session_create_s"] = round(time.perf_counter() - t, 2)
        res["provider"] = om.provider
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, pt.config.vocab_size, (1, 64), generator=g)
        nxt = torch.randint(0, pt.config.vocab_size, (1, 1), generator=g)
        mask64, mask65 = torch.ones(1, 64, dtype=torch.long), torch.ones(1, 65, dtype=torch.long)
        with torch.no_grad():
            pt_past = pt(ids, attention_mask=mask64, use_cache=True).past_key_values
        legacy = [(layer.keys.clone(), layer.values.clone()) for layer in pt_past.layers]
        _, ort_past = om.step(ids.numpy(), mask64.numpy(), om.empty_past(1))

        def pt_prefill():
            with torch.no_grad():
                pt(ids, attention_mask=mask64, use_cache=True)

        def pt_decode():
            cache = DynamicCache(config=pt.config)
            for i, (k, v) in enumerate(legacy):
                cache.update(k, v, i)
            with torch.no_grad():
                pt(nxt, attention_mask=mask65, past_key_values=cache, use_cache=True)

        def ort_prefill():
            om.step(ids.numpy(), mask64.numpy(), om.empty_past(1))

        def ort_decode():
            om.step(nxt.numpy(), mask65.numpy(), ort_past)

        fns = {"pytorch_prefill": pt_prefill, "ort_prefill": ort_prefill,
               "pytorch_decode": pt_decode, "ort_decode": ort_decode}
        med = interleaved_medians_ms(fns, a.repeats, group=by_runtime)
        res["median_ms"] = {k: round(v, 2) for k, v in med.items()}
        res["ort_over_pytorch"] = {"prefill_64": round(med["ort_prefill"] / med["pytorch_prefill"], 3),
                                   "decode_step_past_64": round(med["ort_decode"] / med["pytorch_decode"], 3)}
        with torch.no_grad():
            ref = pt(ids, attention_mask=mask64).logits[0].double()
        got = torch.from_numpy(om.step(ids.numpy(), mask64.numpy(), om.empty_past(1))[0][0].astype(np.float64))
        res["ort_vs_pytorch_rel_logit_error"] = float((ref - got).abs().max() / ref.abs().max())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
