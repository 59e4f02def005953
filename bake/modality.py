"""What kind of model bake is working on, decided once: a causal language model or a diffusers
text-to-image pipeline. Everything that differs between the two lives on one `Modality` object
instead of `isinstance(..., PipelineModel)` / `tokenizer is None` / `model_index.json` checks:
which formats a baked directory holds and how to open one, the default probe prompts, the model
card's library, which commands apply, and how a baked directory is verified.

The one opener underneath is `bake/artifacts.py`. Choose a modality with `of_dir(path)` (a model or
baked directory), `of_model(model)` (a loaded model), `of_loaded(loaded)` or
`by_name(adapter.modality)`. Importing this module costs only `models.diffusion` and `artifacts`;
the verify layer is imported when `verify` is called, so lower layers (fit, exporters) may ask a
modality what it is without depending on verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import artifacts
from .errors import BakeError
from .models.diffusion import DEFAULT_PROMPTS, PipelineModel, is_pipeline_dir
from .models.loading import check_placement, cpu_only


@dataclass(frozen=True)
class VerifyOptions:
    """How a verify runs: extra probe prompts, the fingerprint check; for causal LMs also the
    continuation length, the ONNX Runtime provider, whether generated code may run and which formats
    of the directory to check (None: all it holds)."""

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    check_model: bool = True
    provider: str = "auto"
    trust_code: bool = False
    formats: tuple[str, ...] | None = None
    device: str = "cpu"  # where the reference and the candidates run (cpu | cuda | auto)
    device_map: str | None = None  # or spread by accelerate (auto: GPUs, then CPU)


class Modality(Protocol):
    """The strategy for one kind of model."""

    name: str  # "causal-lm" | "text-to-image" (as `Adapter.modality` names them)
    card_library: str  # the model card's `library_name` for safetensors outputs
    formats: tuple[str, ...]  # what `artifacts.open_artifact` may open for it

    def probes(self) -> list[str]: ...

    def check_dir(self, path: str | Path, flag: str = "--baked") -> None: ...

    def open(self, path: str | Path, fmt: str = "auto", **opts): ...

    def require_causal(self, name: str, why: str) -> None: ...

    def verify(self, model_name: str, specs: list, baked: str | Path, opts: VerifyOptions) -> dict: ...


class _Directories:
    """What both modalities do the same way, on their own marker file and formats."""

    marker: str  # the file that makes a directory a model of this kind
    formats: tuple[str, ...]
    default_format: str  # what `open` opens for "auto"

    def check_dir(self, path: str | Path, flag: str = "--baked") -> None:
        """Fail before any work when `path` is not a model directory of this kind."""
        artifacts.check_dir(path, flag, self.marker)

    def open(self, path: str | Path, fmt: str = "auto", **opts) -> artifacts.Artifact:
        """`artifacts.open_artifact`, restricted to this modality's formats."""
        return artifacts.open_artifact(path, self.default_format if fmt == "auto" else fmt, allowed=self.formats,
                                       **opts)


class CausalLM(_Directories):
    """A transformers causal LM: safetensors checkpoints and ONNX exports, verified on logits and
    greedy continuations (`bake/verify.py`)."""

    name = "causal-lm"
    card_library = "transformers"
    formats = artifacts.CAUSAL_FORMATS
    default_format = "auto"  # the checkpoint, else the ONNX export
    marker = "config.json"

    def probes(self) -> list[str]:
        """verify's built-in probe prompts (also the first prompts of `bake diff`)."""
        from .verify import PROBES

        return list(PROBES)

    def require_causal(self, name: str, why: str) -> None:
        """A causal LM is what the caller needs: nothing to refuse."""

    def verify(self, model_name: str, specs: list, baked: str | Path, opts: VerifyOptions) -> dict:
        """The baked directory (every format it holds) against the hooked original `model_name`."""
        from .models import load
        from .verify import verify

        self.check_dir(baked)
        check_placement(opts.device, opts.device_map)

        def fresh():
            loaded = load(model_name, device=opts.device, device_map=opts.device_map)
            return loaded.model, loaded.tokenizer

        def gguf(ref):  # in llama.cpp, by the GGUF yardstick (the unsteered model's own quantization error)
            from .families import adapter_for
            from .verify_gguf import verify_gguf

            loaded = load(model_name)
            source, adapter = loaded.source, adapter_for(loaded.model)
            del loaded
            return verify_gguf(fresh, specs, ref, Path(baked), source, adapter, opts.max_new_tokens)

        runtime = {"gguf": gguf}
        formats = list(opts.formats) if opts.formats else None
        if Path(baked).is_dir() and "lora" in (formats or artifacts.formats_in(baked)):
            from .models import resolve
            from .verify_gguf import lora_gguf_verifiable

            source = resolve(model_name)
            if lora_gguf_verifiable(Path(baked), source):
                def lora_gguf(ref):  # the llama.cpp LoRA, on the unsteered f32 GGUF at scales 1 and 0
                    from .families import adapter_for
                    from .verify_gguf import verify_lora_gguf

                    loaded = load(model_name)
                    adapter = adapter_for(loaded.model)
                    del loaded
                    return verify_lora_gguf(ref, Path(baked), source, adapter, opts.max_new_tokens)

                runtime["lora-gguf"] = lora_gguf
                formats = (formats or artifacts.formats_in(baked)) + ["lora-gguf"]
        def run(specs, formats):
            return verify(fresh, specs, Path(baked), list(opts.prompts), opts.max_new_tokens,
                          check_model=opts.check_model, formats=formats,
                          provider=opts.provider, trust_code=opts.trust_code, runtime=runtime,
                          device=opts.device, device_map=opts.device_map)

        from .verify_gguf import has_sidecar, with_sidecar

        formats = formats or artifacts.formats_in(baked)
        if "gguf" not in formats or not has_sidecar(Path(baked)):
            return run(specs, formats)
        from .exporters.control_vector import split  # the other formats hold the spec without the shifts
        from .families import adapter_for

        loaded = load(model_name)
        baked_specs = split(loaded.model, adapter_for(loaded.model), specs)[1]
        del loaded
        rest = [f for f in formats if f != "gguf"]
        return with_sidecar(run(baked_specs, rest), run(specs, ["gguf"])) if rest else run(specs, ["gguf"])


class Pipeline(_Directories):
    """A diffusers text-to-image pipeline: a pipeline directory (and an ONNX denoiser), verified on
    latents and pixels (`bake/verify_pipeline.py`)."""

    name = "text-to-image"
    card_library = "diffusers"
    formats = ("pipeline",)
    default_format = "pipeline"  # one `PipelineModel`
    marker = "model_index.json"

    def probes(self) -> list[str]:
        """verify_pipeline's default prompts."""
        return list(DEFAULT_PROMPTS)

    def require_causal(self, name: str, why: str) -> None:
        """Refuse a pipeline where a command measures causal LMs only; `why` says what to do instead."""
        raise BakeError(f"--model: {name!r} is a diffusers pipeline; {why}")

    def verify(self, model_name: str, specs: list, baked: str | Path, opts: VerifyOptions) -> dict:
        """The steered pipeline directory against the hooked original pipeline `model_name`."""
        from .models import resolve
        from .models.diffusion import load_pipeline
        from .verify_pipeline import verify_pipeline

        cpu_only(opts.device, opts.device_map)
        source = resolve(model_name)
        if not is_pipeline_dir(source):
            raise BakeError(f"--model: {model_name!r} is not a diffusers pipeline, but --baked is one")
        return verify_pipeline(lambda dt: load_pipeline(source, dt), specs, Path(baked), list(opts.prompts),
                               check_model=opts.check_model)


CAUSAL_LM, PIPELINE = CausalLM(), Pipeline()
BY_NAME: dict[str, Modality] = {m.name: m for m in (CAUSAL_LM, PIPELINE)}


def by_name(name: str) -> Modality:
    """The modality an adapter names (`Adapter.modality`: "causal-lm" or "text-to-image")."""
    return BY_NAME[name]


def of_dir(path: str | Path) -> Modality:
    """The modality of a model or baked directory: a pipeline when it holds model_index.json."""
    return PIPELINE if is_pipeline_dir(path) else CAUSAL_LM


def of_model(model) -> Modality:
    """The modality of a loaded model (a `PipelineModel` or a causal LM)."""
    return PIPELINE if isinstance(model, PipelineModel) else CAUSAL_LM


def of_loaded(loaded) -> Modality:
    """The modality of a `models.Loaded`."""
    return of_model(loaded.model)


def verify_baked(model_name: str, specs: list, baked: str | Path, opts: VerifyOptions = VerifyOptions()) -> dict:
    """`bake verify`: the baked directory's modality decides how it is verified against `model_name`."""
    return of_dir(baked).verify(model_name, specs, baked, opts)
