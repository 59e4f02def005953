"""Text-to-image pipelines (diffusers): loading a pipeline directory as one module (`PipelineModel`,
whose children are the pipeline's torch components). Its sites, and why they fold, are the diffusers
family's: see bake/families/pipelines.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import BakeError, first_line
DENOISERS = ("unet", "transformer", "prior")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PipelineModel(torch.nn.Module):
    """The torch components of a diffusers pipeline under one root, for binding and hooks."""

    def __init__(self, pipe, source: Path | str = ""):
        super().__init__()
        self.pipe = [pipe]  # a list, so the pipeline is not registered as a child
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module):
                self.add_module(name, comp)
        self.config = SimpleNamespace(model_type="diffusers", architectures=[type(pipe).__name__],
                                      components=sorted(self._modules), source=str(source))

    @property
    def pipeline(self):
        return self.pipe[0]

    def denoiser_name(self) -> str | None:
        return next((n for n in DENOISERS if n in self._modules), None)


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> PipelineModel:
    """Load a pipeline directory from safetensors only (never unpickles, never runs remote code)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise BakeError("--model: a diffusers pipeline needs the diffusers package: pip install 'bake-steering[t2i]'") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    except Exception as e:  # diffusers raises many kinds for a bad directory
        first = first_line(e)
        raise BakeError(f"--model: cannot load {str(path)!r} as a diffusers pipeline: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        pipe.to(device)
    root = PipelineModel(pipe, path)
    for comp in root.children():
        comp.eval()
    if root.denoiser_name() is None:
        raise BakeError(f"--model: pipeline {type(pipe).__name__} has no denoiser bake knows "
                        f"(looked for components {', '.join(DENOISERS)})")
    return root


DEFAULT_PROMPTS = ["a photo of a cat in the city", "a watercolor landscape with a red sky",
                   "a portrait of a dog at night", "an oil painting of a house and a tree"]


def run_pipeline(root: PipelineModel, prompts: list[str], steps: int = 2, seed: int = 0, output_type: str = "latent",
                 guidance: float | None = None, size: int | None = None):
    """One seeded call of the pipeline (the same call for the original, hooked and baked pipelines)."""
    import inspect

    pipe = root.pipeline
    params = inspect.signature(pipe.__call__).parameters
    kw = {"num_inference_steps": steps, "output_type": output_type,
          "generator": torch.Generator("cpu").manual_seed(seed)}
    if "use_resolution_binning" in params:  # PixArt snaps sizes to its training buckets
        kw["use_resolution_binning"] = False
    if guidance is not None and "guidance_scale" in params:
        kw["guidance_scale"] = guidance
    if size is not None:
        kw["height"] = kw["width"] = size
    wrapped = None
    if hasattr(pipe, "prepare_latents") and next(iter(root.parameters())).dtype != torch.float32:
        wrapped = pipe.prepare_latents  # draw the initial noise in float32 whatever the dtype: same seed, same noise
        pipe.prepare_latents = _float32_noise(wrapped)
    try:
        with torch.no_grad():
            return pipe(prompts, **kw).images
    finally:
        if wrapped is not None:
            del pipe.prepare_latents


def _float32_noise(prepare):
    def call(*args, **kwargs):
        dt = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.dtype)), None)
        args = [torch.float32 if isinstance(a, torch.dtype) else a for a in args]
        kwargs = {k: torch.float32 if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}
        out = prepare(*args, **kwargs)
        cast = lambda t: t.to(dt) if torch.is_tensor(t) and t.is_floating_point() and dt is not None else t  # noqa: E731
        return tuple(cast(t) for t in out) if isinstance(out, tuple) else cast(out)

    return call


def default_size(root: PipelineModel) -> int:
    """The pipeline's native image size in pixels."""
    den = getattr(root, root.denoiser_name())
    pipe = root.pipeline
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(den.config, "sample_size", None)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    if getattr(pipe, "default_sample_size", None):
        sample = pipe.default_sample_size
    return int(sample * scale) if sample else 64
