"""verify for text-to-image pipelines: the steered pipeline, loaded from disk as a user would, against
the hooked original with the same seed.

Each probe prompt runs through the whole pipeline (text encoders, every denoising step, the VAE):
the final latents are compared (relative error: max |Δ| / max |reference|) and so are the decoded
images (max abs pixel error on the [0, 1] scale). float32 passes when the latent error is ≤ 1e-5
relative, or, above that, when the steered pipeline is as close to the hooked pipeline run in
float64 as the hooked float32 pipeline is (a deep stack of maps carries its own rounding); an ONNX denoiser, where exported, is checked on the inputs of the first denoising call
of the hooked run (relative output error ≤ 1e-4: ONNX Runtime's kernels round differently
from PyTorch's).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from .models.diffusion import DEFAULT_PROMPTS, default_size, load_pipeline, run_pipeline
from .runtime import steered
from .spec import Spec

LATENT_TOL = 1e-5
NOISE_FACTOR = 1.5
ONNX_TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def verify_pipeline(fresh, specs: list[Spec], baked: Path, prompts: list[str] | None = None, steps: int = 2,
                    seed: int = 0, size: int | None = None, check_model: bool = True) -> dict:
    prompts = prompts or DEFAULT_PROMPTS
    root = fresh(torch.float32)
    if size is None:  # exactness does not depend on resolution: at most 256 px (SDXL / FLUX default to 1024)
        native = default_size(root)
        size = native if native <= 256 else 256
    den_name = root.denoiser_name()
    den = getattr(root, den_name)
    den_class = type(den)
    first_call: dict = {}

    def grab(module, args, kwargs, output):
        if not first_call:
            first_call["args"] = [a.detach().clone() if torch.is_tensor(a) else a for a in args]
            first_call["kwargs"] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            first_call["out"] = out.detach().clone()

    with steered(root, specs, check_model=check_model):
        h = den.register_forward_hook(grab, with_kwargs=True)
        try:
            lat_ref = run_pipeline(root, prompts, steps, seed, "latent", size=size)
        finally:
            h.remove()
        img_ref = run_pipeline(root, prompts, steps, seed, "np", size=size)
    lat_orig = run_pipeline(root, prompts, steps, seed, "latent", size=size)
    del root
    gc.collect()
    report = {"kind": "pipeline", "prompts": len(prompts), "steps": steps, "seed": seed, "size": size,
              "steered_vs_original_latent_rel": _rel(lat_orig, lat_ref)}
    if (baked / "model_index.json").is_file():
        root_b = load_pipeline(baked)
        lat = run_pipeline(root_b, prompts, steps, seed, "latent", size=size)
        img = run_pipeline(root_b, prompts, steps, seed, "np", size=size)
        report.update({"latent_max_abs": float((lat - lat_ref).abs().max()), "latent_rel": _rel(lat, lat_ref),
                       "pixel_max_abs": float(np.abs(np.asarray(img) - np.asarray(img_ref)).max())})
        del root_b
    onnx_path = baked / den_name / "model.onnx"
    if onnx_path.is_file():
        from .exporters.onnx_denoiser import run_onnx_denoiser

        got = run_onnx_denoiser(onnx_path, den_class, first_call["args"], first_call["kwargs"])
        report["onnx_denoiser_rel"] = _rel(torch.from_numpy(got), first_call["out"])
    latent_ok = report.get("latent_rel", 0.0) <= LATENT_TOL
    report["criterion"] = f"latent relative error <= {LATENT_TOL:g}"
    if not latent_ok:  # float32 noise of a deep stack of maps? compare both with the exact (float64) answer
        root64 = fresh(torch.float64)
        with steered(root64, specs, check_model=check_model):
            lat64 = run_pipeline(root64, prompts, steps, seed, "latent", size=size).double()
        del root64
        own, got = _rel(lat_ref.double(), lat64), _rel(lat.double(), lat64)
        report.update({"exact_ref": "hooked float64", "hooked_fp32_vs_fp64_rel": own, "baked_vs_fp64_rel": got})
        latent_ok = got <= NOISE_FACTOR * own
        report["criterion"] = (f"latent error vs the float64 hooked pipeline <= {NOISE_FACTOR:g} x the hooked "
                               f"float32 pipeline's own")
    ok = latent_ok and report.get("onnx_denoiser_rel", 0.0) <= ONNX_TOL
    if onnx_path.is_file():
        report["criterion"] += f"; ONNX denoiser relative error <= {ONNX_TOL:g}"
    report["passed"] = bool(ok)
    return report
