"""What a bake reads and writes, per kind of input: a causal LM loaded in memory, a safetensors
checkpoint streamed from disk (never loaded), or a diffusers pipeline. The compiler (`bake.compiler`)
runs the same steps on each: open → store → bind → passes → export → verify → card; a source says
how its tensors are held (`store`), which formats it writes (`check`, `export`), how it is verified
and what its model card says."""

from __future__ import annotations

import contextlib
import gc
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import BakeError
from .exporters import shards
from .models import load, resolve
from .models.loading import cpu_only
from .models.loading import meta_model
from .options import BakeOptions
from .store import ModuleStore


class LoadedLM:
    """A causal LM loaded in memory (float32): folds write its parameters; safetensors and ONNX out."""

    streamed = False

    def __init__(self, name: str, loaded):
        self.name, self.loaded = name, loaded
        self.model, self.tokenizer, self.path = loaded.model, loaded.tokenizer, loaded.source

    def check(self, opts: BakeOptions) -> None:
        if "onnx" in opts.formats:
            from .exporters import onnx_lm as onnx_exporter

            onnx_exporter.check_supported(self.model)  # before any work
        if "gguf" in opts.formats or "control-vector" in opts.formats:
            from .exporters import gguf_lm
            from .families import adapter_for

            self.adapter = adapter_for(self.model)  # a control vector is verified on the f32 GGUF of the original
            flag, kind = ("--format gguf", opts.gguf_type) if "gguf" in opts.formats else ("--format control-vector", "f32")
            self.gguf_type = gguf_lm.check_supported(self.model, self.adapter, self.path, kind, flag, opts.imatrix)
            if "control-vector" in opts.formats:
                gguf_lm.llama_cpp(flag)  # it is verified in llama.cpp
        if "lora" in opts.formats and isinstance(self.path, Path):
            from .exporters import gguf_lm

            gguf_lm.source_gguf(self.path, "--format lora")  # its llama.cpp LoRA is verified on this GGUF

    def prepare(self, specs, opts: BakeOptions) -> list:
        """What needs the original weights and the specs before the folds: a LoRA's deltas, a control
        vector's directions (refused here, before any work, where a map is neither). Returns the specs to
        bake: with `--format gguf,control-vector`, those without the layer-output shifts the sidecar takes."""
        if "control-vector" in opts.formats:
            from .exporters import control_vector

            if "gguf" in opts.formats:
                self.directions, specs = control_vector.split(self.model, self.adapter, specs)
            else:
                self.directions = control_vector.directions(self.model, self.adapter, specs)
        if "lora" in opts.formats:
            from .exporters import lora
            from .families import adapter_for

            self.adapter = adapter_for(self.model)
            self.lora = lora.deltas(self.model, self.adapter, specs)
        self.baked_specs = specs
        return specs

    @contextlib.contextmanager
    def store(self, tmp: Path):
        yield ModuleStore(self.model)

    def fold_dtype(self, opts: BakeOptions) -> torch.dtype:
        return torch.float64 if (opts.dtype or "float32") == "float32" else torch.float32

    def export(self, plan, tmp: Path, opts: BakeOptions, log) -> None:
        from .exporters import checkpoint as st_exporter

        if "gguf" in opts.formats:  # what llama.cpp cannot hold is refused before any file is written
            from .exporters import gguf_lm

            self.layout = gguf_lm.bias_layout(plan.model, self.adapter, self.path)
        if "onnx" in opts.formats:
            from .exporters import onnx_lm as onnx_exporter

            onnx_exporter.export(plan.model, self.tokenizer, tmp, opts.dtype or "float32", log=log,
                                 layout=opts.onnx_layout)
        if "safetensors" in opts.formats:
            st_exporter.export(plan, self.tokenizer, tmp, opts.dtype or "float32")
            if plan.inserted:
                from .modules import write_code

                write_code(tmp, type(plan.model).__name__)
        gguf = None
        if "gguf" in opts.formats:
            imatrix = self._imatrix(plan, tmp, opts, log)
            gguf = gguf_lm.write(tmp, self.path, tmp, self.gguf_type, self.adapter, log=log, drop=self.layout.drop,
                                 imatrix=imatrix)
        if "lora" in opts.formats:
            self._export_lora(plan, tmp, log)
        if "control-vector" in opts.formats:
            self._export_control_vector(plan, tmp, gguf, log)

    def _imatrix(self, plan, tmp: Path, opts: BakeOptions, log) -> dict | None:
        """The importance matrix for the quantizer: llama-imatrix's file as given, or measured on the baked
        model over the calibration texts; written beside the GGUF (imatrix.gguf) for verify and llama.cpp.
        None without --imatrix, or for a float type (nothing is quantized)."""
        from .exporters import gguf_imatrix, gguf_lm

        if not opts.imatrix or self.gguf_type in ("f32", "f16", "bf16"):
            return None
        if Path(opts.imatrix).suffix == ".gguf":
            imatrix = gguf_imatrix.read_gguf(Path(opts.imatrix))
            gguf_imatrix.write(imatrix, tmp, 1)
            log(f"  gguf                   importance matrix: {len(imatrix)} tensors from {Path(opts.imatrix).name}")
            return imatrix
        arch = gguf_lm.written_arch(plan.model, self.adapter, self.path)
        names = gguf_imatrix.linear_names(plan.model, arch)
        imatrix, tokens = gguf_imatrix.measure(plan.model, self.tokenizer, gguf_imatrix.texts(Path(opts.imatrix)), names)
        gguf_imatrix.write(imatrix, tmp, tokens)
        log(f"  gguf                   importance matrix: {len(imatrix)} tensors, measured on the steered model over "
            f"{tokens} tokens of {Path(opts.imatrix).name} (imatrix.gguf)")
        return imatrix

    def _export_control_vector(self, plan, tmp: Path, gguf: Path | None, log) -> None:
        """The control vector: alone (every map, on the unsteered GGUF), or the sidecar of the steered GGUF
        `gguf` (the layer-output shifts it does not hold)."""
        from .exporters import control_vector, gguf_lm

        dirs = self.directions
        hint = gguf_lm.arch_of(gguf) if gguf else gguf_lm.arch_for(self.adapter, self.path)
        f = control_vector.write(dirs, hint, tmp, sidecar_of=gguf.name if gguf else None)
        what = f"sidecar of {gguf.name} (the layer-output shifts)" if gguf else "llama.cpp control vector"
        log(f"  control-vector         {f.name}: {what}, layers {list(dirs)}")
        run = f"with -m {gguf.name} " if gguf else ""
        plan.note("control-vector", "files", f"{f.name} (llama.cpp {run}--control-vector-scaled {f.name} <strength>)")

    def _export_lora(self, plan, tmp: Path, log) -> None:
        from .exporters import lora

        where = lora.write_peft(plan.model, self.lora, tmp, str(Path(self.path).resolve()))
        ranks = sorted({A.shape[0] for A, _ in self.lora.values()})
        log(f"  lora                   {lora.DIR}/: PEFT adapter, {len(self.lora)} module(s), rank {ranks}")
        from .verify_gguf import lora_gguf_runnable

        from .exporters import gguf_convert
        from .exporters.gguf_lm import source_gguf

        from_gguf = isinstance(self.path, Path) and source_gguf(self.path, "--format lora") is not None
        gguf = lora_gguf_runnable(self.path) and (bool(self.adapter.gguf_arch) or not from_gguf)  # verified there
        if gguf and from_gguf:
            g = lora.write_gguf(self.lora, self.adapter, plan.model.config, tmp)
            log(f"  lora                   {lora.DIR}/{g.name}: llama.cpp LoRA ({self.adapter.gguf_arch})")
        elif gguf:
            g = gguf_convert.convert_lora(tmp / lora.DIR, Path(self.path), tmp / lora.DIR / "adapter-F32.gguf")
            log(f"  lora                   {lora.DIR}/{g.name}: llama.cpp LoRA, by llama.cpp's LoRA converter")
        plan.note("lora", "files", f"{where.name}/ (PEFT" + (", llama.cpp GGUF)" if gguf else ")"))

    def release(self) -> None:
        """Verify reloads both models: never hold two copies while it runs."""
        self.loaded = self.model = None
        gc.collect()

    def verify(self, plan, specs, tmp: Path, opts: BakeOptions) -> dict:
        """Every format against the hooked reference of `specs`. With `--format gguf,control-vector` the
        GGUF runs with its sidecar against the whole spec, the other formats against the specs baked
        (without the layer-output shifts the sidecar took)."""
        if "gguf" in opts.formats and "control-vector" in opts.formats:
            part = self._verify(plan, self.baked_specs, tmp, opts, [f for f in opts.formats
                                                                    if f not in ("gguf", "control-vector")])
            from .verify_gguf import with_sidecar

            return with_sidecar(part, self._verify(plan, specs, tmp, opts, ["gguf"]))
        return self._verify(plan, specs, tmp, opts, list(opts.formats))

    def _verify(self, plan, specs, tmp: Path, opts: BakeOptions, formats: list[str]) -> dict:
        from . import verify as verify_mod

        name = self.name
        runtime = {}
        if "gguf" in formats:
            from .verify_gguf import verify_gguf

            runtime["gguf"] = lambda ref: verify_gguf(lambda: fresh(name, opts), specs, ref, tmp, self.path,  # noqa: E731
                                                      self.adapter, opts.max_new_tokens)
        if "control-vector" in formats:
            from .verify_gguf import verify_control_vector

            runtime["control-vector"] = lambda ref: verify_control_vector(ref, tmp, self.path, self.adapter,  # noqa: E731
                                                                          opts.max_new_tokens)
        from .verify_gguf import lora_gguf_verifiable, verify_lora_gguf

        if "lora" in formats and lora_gguf_verifiable(tmp, self.path):
            runtime["lora-gguf"] = lambda ref: verify_lora_gguf(ref, tmp, self.path, self.adapter,  # noqa: E731
                                                                opts.max_new_tokens)
            formats = formats + ["lora-gguf"]  # after "lora": reported under its own key
        v = verify_mod.verify(lambda: fresh(name, opts), specs, tmp, list(opts.prompts or []) or None,
                              max_new_tokens=opts.max_new_tokens, check_model=opts.check_model,
                              formats=formats, trust_code=bool(plan.inserted), runtime=runtime,
                              device=opts.device, device_map=opts.device_map)
        v["approximate"] = opts.approximate
        return v

    @staticmethod
    def failure(v: dict) -> str:
        bad = [(f, r) for f, r in [("", v)] + [(f, v[f]) for f in ("onnx", "gguf", "control-vector", "lora-gguf")
                                      if isinstance(v.get(f), dict)]
               if not r.get("passed", True) or f == ""]
        f, r = next(((f, r) for f, r in bad[1:]), bad[0]) if not v.get("passed") and len(bad) > 1 else bad[0]
        where = f" ({f})" if f else ""
        return (f"verify{where}: baked model differs from the hooked reference (max abs {r['max_abs']:.3g}, relative "
                f"{r['max_rel']:.3g}, greedy identical {r['greedy_same']}/{r['prompts']}; {r.get('criterion', '')})")

    def card_dtype(self, opts: BakeOptions) -> str:
        return opts.dtype or "float32"

    @staticmethod
    def shows(pass_name: str) -> bool:
        return True


def fresh(model_name: str, opts: BakeOptions | None = None):
    """A fresh (model, tokenizer) of the original, where verify runs it."""
    opts = opts or BakeOptions()
    loaded = load(model_name, device=opts.device, device_map=opts.device_map)
    return loaded.model, loaded.tokenizer


@contextlib.contextmanager
def _background():
    """One worker thread; on the way out (an error too) queued work is dropped and running work
    finished, so the staging directory is never removed under a copy."""
    ex = ThreadPoolExecutor(1)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class StreamedCheckpoint(LoadedLM):
    """A safetensors checkpoint (sharded or not) baked without loading it: the skeleton is built on the
    meta device from config.json; the tensors are read and written through a `CheckpointStore`; changed
    tensors are patched into copies of their shards. Peak memory: about two groups' touched modules."""

    streamed = True

    def __init__(self, name: str, path: Path, link: bool):
        self.name, self.path, self.link, self.tokenizer = name, path, link, None
        self.ckpt = shards.Checkpoint(path)
        self.model = None  # the skeleton: built once the shard copies have started (`store`)

    def check(self, opts: BakeOptions) -> None:
        """`BakeOptions.check` already refused what a stream cannot write; a GGUF comes from a transformers
        checkpoint through llama.cpp's converter, which reads the baked shards lazily."""
        if "gguf" in opts.formats:
            from .exporters import gguf_lm

            if gguf_lm.source_gguf(self.path) is not None:
                raise BakeError("--stream --format gguf: from a transformers checkpoint (a GGUF source is baked in "
                                "memory: drop --stream)")
            self.gguf_type = gguf_lm.check_supported(None, None, self.path, opts.gguf_type, "--format gguf",
                                                     opts.imatrix)

    @contextlib.contextmanager
    def store(self, tmp: Path):
        # copier: shard copies (they start now and run while the plan is built and folded); reader: the
        # next group's tensors, read while this group folds
        with _background() as copier, _background() as reader:
            self.placed = shards.start_copies(self.ckpt, tmp, copier, self.link)
            self.model = meta_model(self.path)  # importing transformers' model code takes seconds: overlap it
            spill = tmp / ".spill"
            spill.mkdir()
            self.store_ = shards.CheckpointStore(self.ckpt, spill, reader)
            yield self.store_

    def fold_dtype(self, opts: BakeOptions) -> torch.dtype:
        half = {torch.bfloat16, torch.float16}
        return torch.float32 if any(self.ckpt.dtype(n) in half for n in self.ckpt.entries) else torch.float64

    def export(self, plan, tmp: Path, opts: BakeOptions, log) -> None:
        did = shards.write_checkpoint(self.store_, tmp, self.placed, self.link)
        shutil.rmtree(tmp / ".spill")
        shards.copy_side_files(self.path, tmp, self.ckpt)
        plan.model.config.save_pretrained(str(tmp))
        plan.note("stream", "shards", did)
        if "gguf" in opts.formats:
            from .exporters import gguf_lm
            from .families import adapter_for

            self.adapter = adapter_for(plan.model)
            layout = gguf_lm.bias_layout(plan.model, self.adapter, self.path, written=tmp)
            imatrix = self._imatrix(plan, tmp, opts, log)
            gguf_lm.write(tmp, self.path, tmp, self.gguf_type, self.adapter, log=log, drop=layout.drop,
                          imatrix=imatrix)

    def release(self) -> None:
        self.model = None

    def card_dtype(self, opts: BakeOptions) -> str:
        return "as stored"

    @staticmethod
    def shows(pass_name: str) -> bool:
        """A streamed bake is large: the log names what changed the files, not every site."""
        return pass_name in ("architecture-rewrite", "stream", "portable")


class LoadedPipeline(LoadedLM):
    """A diffusers pipeline: the touched components are saved again, everything else copied; an ONNX
    denoiser on request; verified on its latents against the hooked pipeline."""

    def check(self, opts: BakeOptions) -> None:
        if opts.insert_modules:
            raise BakeError("--insert-modules: not for diffusers pipelines yet (every default T2I site folds exactly)")
        cpu_only(opts.device, opts.device_map)
        if {"gguf", "lora", "control-vector"} & set(opts.formats):
            raise BakeError("--format: gguf, lora and control-vector are for causal LMs (a pipeline writes "
                            "safetensors and onnx)")
        if "onnx" in opts.formats:
            from .exporters import onnx_denoiser

            onnx_denoiser.check_supported(self.model)  # before any work

    def fold_dtype(self, opts: BakeOptions) -> torch.dtype:
        return torch.float64

    def export(self, plan, tmp: Path, opts: BakeOptions, log) -> None:
        from .exporters import pipeline as pipe_exporter

        comps = pipe_exporter.export(plan, Path(self.path), tmp) if "safetensors" in opts.formats else []
        if "onnx" in opts.formats:
            from .exporters import onnx_denoiser

            onnx_denoiser.export(plan.model, tmp, log=log)
        if comps:
            plan.config_changes["components_rewritten"] = comps

    def verify(self, plan, specs, tmp: Path, opts: BakeOptions) -> dict:
        from .models.diffusion import load_pipeline
        from .verify_pipeline import verify_pipeline

        source = Path(self.path)
        return verify_pipeline(lambda dt: load_pipeline(source, dt), specs, tmp, list(opts.prompts or []) or None,
                               check_model=opts.check_model)

    @staticmethod
    def failure(v: dict) -> str:
        return (f"verify: steered pipeline differs from the hooked reference (latent relative error "
                f"{v.get('latent_rel', float('nan')):.3g}, ONNX denoiser {v.get('onnx_denoiser_rel', float('nan')):.3g})")

    def card_dtype(self, opts: BakeOptions) -> str:
        return "as stored"


def open_source(name: str, opts: BakeOptions):
    """The source for `name`: streamed when asked, or by default for a sharded checkpoint when nothing
    needs the model loaded (`BakeOptions.simple`); else loaded, as a pipeline or a causal LM."""
    path = resolve(name)
    sharded = isinstance(path, Path) and (path / shards.INDEX).is_file()
    streamed = bool(opts.stream) or (opts.stream is None and opts.simple and sharded)
    if opts.link and not streamed:
        raise BakeError("--link: only for a streaming bake (--stream, or a sharded checkpoint)")
    if streamed:
        if not isinstance(path, Path):
            raise BakeError(f"--model: streaming needs a local checkpoint directory, got the hub id {name!r} "
                            f"(download it first)")
        return StreamedCheckpoint(name, path, opts.link)
    loaded = load(name)
    from .families import adapter_for

    if adapter_for(loaded.model).modality == "text-to-image":
        return LoadedPipeline(name, loaded)
    return LoadedLM(name, loaded)
