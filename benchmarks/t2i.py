"""Text-to-image: denoiser step latency original vs baked vs hooked (PyTorch eager, and the baked
UNet in ONNX Runtime on CPU), interleaved in one process, medians and ratios; and the time to apply
a spec to a pipeline (fit, bake with verification) next to copying the pipeline directory.
Random-weight Stable Diffusion pipeline (UNet channels 64/128, 32×32 latents, CLIP text encoder),
a spec with an affine map at every norm of the UNet (AcT's T2I sites). Writes
benchmarks/results/t2i.json.

    python benchmarks/t2i.py [--width 64] [--latent 32] [--batch 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bake import compiler
from bake.exporters.onnx_denoiser import as_kwargs, capture, flatten
from bake.maps import Map
from bake.families.pipelines import PipelineAdapter
from bake.models.diffusion import load_pipeline
from bake.models.tiny_pipelines import save_tiny_pipeline
from bake.runtime import steered
from bake.spec import Spec, write
from timing import by_runtime, interleaved_medians_ms

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one prompt with CFG)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "t2i.json"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="bake-t2i-"))
    try:
        src = save_tiny_pipeline("sd", work / "pipe", width=a.width, sample_size=a.latent)
        root = load_pipeline(src)
        ad = PipelineAdapter()
        cat = ad.sites(root)
        g = torch.Generator().manual_seed(0)
        sites = [(n, [Map("affine", 1.0, {"a": 1 + 0.2 * torch.randn(cat[n].units, generator=g),
                                          "b": 0.2 * torch.randn(cat[n].units, generator=g)})])
                 for n in ad.resolve(root, ["norms"])]
        spec = Spec(sites, method="random")
        write(spec, work / "s.json")

        t = time.perf_counter()
        shutil.copytree(src, work / "copy")
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        res = compiler.apply(str(src), [str(work / "s.json")], work / "out", formats=["safetensors", "onnx"],
                            log=lambda *_: None)
        apply_s = time.perf_counter() - t
        t = time.perf_counter()
        compiler.apply(str(src), [str(work / "s.json")], work / "out2", run_verify=False, log=lambda *_: None)
        apply_nv_s = time.perf_counter() - t

        baked = load_pipeline(work / "out")
        args, kwargs = capture(root)
        kw = as_kwargs(root.unet, args, kwargs)
        kw = {k: (v[:1].repeat(a.batch, *[1] * (v.dim() - 1)) if torch.is_tensor(v) and v.dim() >= 1 else v)
              for k, v in kw.items()}
        kw["return_dict"] = False
        import onnxruntime as ort

        sess = ort.InferenceSession(str(work / "out" / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
        names, values, _ = flatten({k: v for k, v in kw.items() if k != "return_dict"})
        feed = {n: v.numpy() for n, v in zip(names, values) if n in {i.name for i in sess.get_inputs()}}

        hooked = load_pipeline(src)  # a second copy with the hooks registered once, as a hooking tool would
        with torch.no_grad(), steered(hooked, spec):
            ms = interleaved_medians_ms({
                "original": lambda: root.unet(**kw),
                "baked": lambda: baked.unet(**kw),
                "hooked": lambda: hooked.unet(**kw),
                "baked_onnx_cpu": lambda: sess.run(None, feed),
            }, repeats=a.repeats, group=by_runtime)
            ref = hooked.unet(**kw)[0]
            got = baked.unet(**kw)[0]
        result = {
            "pipeline": f"random-weight StableDiffusionPipeline, UNet channels {a.width}/{2 * a.width}, "
                        f"{a.latent}x{a.latent} latents, CLIP text encoder",
            "spec": f"affine maps at every UNet norm ({len(sites)} sites: GroupNorm and LayerNorm)",
            "denoiser_batch": a.batch, "repeats": a.repeats, "threads": torch.get_num_threads(),
            "step_ms": {k: round(v, 2) for k, v in ms.items()},
            "ratios": {"baked_vs_original": round(ms["baked"] / ms["original"], 3),
                       "hooked_vs_original": round(ms["hooked"] / ms["original"], 3),
                       "baked_onnx_vs_baked_torch": round(ms["baked_onnx_cpu"] / ms["baked"], 3)},
            "baked_vs_hooked_step_rel": float((got - ref).abs().max() / ref.abs().max()),
            "apply_s": {"bake_safetensors_onnx_with_verify": round(apply_s, 2), "bake_without_verify": round(apply_nv_s, 2),
                        "copy_pipeline_dir": round(copy_s, 3)},
            "verification": {k: res.verification[k] for k in ("latent_rel", "pixel_max_abs", "onnx_denoiser_rel")},
            "machine": f"{platform.machine()}, torch {torch.__version__}",
        }
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
