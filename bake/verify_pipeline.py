"""verify for text-to-image pipelines: the steered pipeline, loaded from disk as a user would, against
the hooked original with the same seed.

Each probe prompt runs through the whole pipeline (text encoders, every denoising step, the VAE):
the final latents are compared (relative error: max |Δ| / max |reference|) and so are the decoded
images (max abs pixel error on the [0, 1] scale). float32 passes when the latent error is ≤ 1e-5
relative, or, above that, when the steered pipeline is as close to the hooked pipeline run in
float64 as the hooked float32 pipeline is (a deep stack of maps carries its own rounding); an ONNX denoiser, where exported, is checked on the inputs of the first denoising call
of the hooked run (relative output error ≤ 1e-4: ONNX Runtime's kernels round differently
from PyTorch's). The float64 fallback and `NOISE_FACTOR` are `bake/yardstick.py`'s (shared with
verify); the steered pipeline is opened by `bake/artifacts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import denoiser_graph, open_artifact, pipeline_formats
from .models.diffusion import DEFAULT_PROMPTS, default_size, run_pipeline
from .runtime import steered
from .spec import Spec
from .yardstick import NOISE_FACTOR, float64_verdict, fresh_run

LATENT_TOL = 1e-5
ONNX_TOL = 1e-4
__all__ = ["LATENT_TOL", "NOISE_FACTOR", "ONNX_TOL", "verify_pipeline"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@dataclass
class _Calls:
    """The seeded pipeline call that the hooked, original and steered pipelines all make."""

    prompts: list[str]
    steps: int
    seed: int
    size: int | None

    def __call__(self, root, output: str):
        return run_pipeline(root, self.prompts, self.steps, self.seed, output, size=self.size)


def verify_pipeline(fresh, specs: list[Spec], baked: Path, prompts: list[str] | None = None, steps: int = 2,
                    seed: int = 0, size: int | None = None, check_model: bool = True) -> dict:
    """`fresh(dtype)` returns a fresh `PipelineModel` of the unmodified pipeline at `dtype` (the
    yardstick's loader contract). The steered pipeline in `baked` (and its ONNX denoiser, if exported)
    runs the same seeded calls as the hooked original."""
    baked = Path(baked)
    calls = _Calls(prompts or DEFAULT_PROMPTS, steps, seed, size)
    ref = fresh_run(fresh, torch.float32, lambda root: _reference(root, specs, check_model, calls))
    report = {"kind": "pipeline", "prompts": len(calls.prompts), "steps": steps, "seed": seed, "size": calls.size,
              "steered_vs_original_latent_rel": _rel(ref["original"], ref["latent"])}
    formats = pipeline_formats(baked, ref["denoiser"])
    lat = None
    if "safetensors" in formats:
        root_b = open_artifact(baked, "pipeline", flag="--baked", allowed=("pipeline",)).model
        lat, img = calls(root_b, "latent"), calls(root_b, "np")
        report.update({"latent_max_abs": float((lat - ref["latent"]).abs().max()),
                       "latent_rel": _rel(lat, ref["latent"]),
                       "pixel_max_abs": float(np.abs(np.asarray(img) - np.asarray(ref["image"])).max())})
        del root_b
    if "onnx" in formats:
        from .exporters.onnx_denoiser import run_onnx_denoiser

        first = ref["first_call"]
        got = run_onnx_denoiser(denoiser_graph(baked, ref["denoiser"]), ref["denoiser_class"], first["args"],
                                first["kwargs"])
        report["onnx_denoiser_rel"] = _rel(torch.from_numpy(got), first["out"])
    judged = _judge_latents(fresh, specs, check_model, calls, ref["latent"], lat, report.get("latent_rel", 0.0))
    latent_ok = judged.pop("latent_ok")
    report.update(judged)
    if "onnx" in formats:
        report["criterion"] += f"; ONNX denoiser relative error <= {ONNX_TOL:g}"
    report["passed"] = bool(latent_ok and report.get("onnx_denoiser_rel", 0.0) <= ONNX_TOL)
    return report


def _reference(root, specs: list[Spec], check_model: bool, calls: _Calls) -> dict:
    """The hooked float32 run (latents, images, the denoiser's first call) and the original's latents;
    settles `calls.size` when it was left to the pipeline."""
    if calls.size is None:  # exactness does not depend on resolution: at most 256 px (SDXL / FLUX default to 1024)
        calls.size = min(default_size(root), 256)
    den_name = root.denoiser_name()
    den = getattr(root, den_name)
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
            latent = calls(root, "latent")
        finally:
            h.remove()
        image = calls(root, "np")
    return {"denoiser": den_name, "denoiser_class": type(den), "first_call": first_call,
            "latent": latent, "image": image, "original": calls(root, "latent")}


def _judge_latents(fresh, specs, check_model: bool, calls: _Calls, lat_ref, lat, latent_rel: float) -> dict:
    """The latent criterion: relative error within `LATENT_TOL`, or above it (float32 noise of a deep
    stack of maps?) as close to the hooked float64 pipeline as the hooked float32 one (the yardstick)."""
    out = {"criterion": f"latent relative error <= {LATENT_TOL:g}", "latent_ok": latent_rel <= LATENT_TOL}
    if not out["latent_ok"]:
        def hooked64(root):
            with steered(root, specs, check_model=check_model):
                return calls(root, "latent").double()

        verdict = float64_verdict(fresh, hooked64, lambda exact, x: _rel(x.double(), exact), lat_ref, lat, "rel")
        out["latent_ok"] = verdict.pop("passed")
        out.update(verdict)
        out["criterion"] = (f"latent error vs the float64 hooked pipeline <= {NOISE_FACTOR:g} x the hooked "
                            f"float32 pipeline's own")
    return out
