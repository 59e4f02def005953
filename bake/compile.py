"""The pipeline: load → bind (plan) → passes → export (staged) → verify → rename into place."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import exporters, passes, verify as verify_mod
from .errors import BakeError, CheckFailed
from .exporters import card, portable
from .exporters import safetensors as st_exporter
from .models import load
from .plan import bind
from .spec import Spec
from .spec import check_strength
from .spec import read as read_spec


@dataclass
class ApplyResult:
    out: Path
    report: list[tuple[str, str, str]]
    config_changes: dict
    verification: dict | None
    seconds: float


def read_specs(paths: list[str], strength: float | None = None) -> list[Spec]:
    if not paths:
        raise BakeError("--spec: give at least one spec")
    specs = [read_spec(p) for p in paths]
    if strength is not None:
        strength = check_strength(strength, "--strength")
        specs = [s.with_strength(strength) for s in specs]
    return specs


def spec_info(s: Spec) -> dict:
    strengths = sorted({m.strength for _, maps in s.sites for m in maps})
    return {"file": s.path.name if s.path else None, "sha256": s.sha256() if s.path else "",
            "method": s.method, "strengths": strengths, "sites": len(s.sites)}


def input_paths(specs: list[Spec], model_name: str, extra=()) -> list[tuple[str, object]]:
    """Everything a bake reads from disk, as (what, path): spec manifests and tensor files, the model as
    named, more files (prompts)."""
    return ([("spec file", f) for s in specs for f in s.files] + [("model directory", model_name)]
            + [("input file", f) for f in extra])


FORMATS = ("safetensors", "onnx")


def parse_formats(text: str) -> list[str]:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise BakeError(f"--format: unknown format {(bad or [text])[0]!r} (known: {', '.join(FORMATS)}; "
                        f"comma-separate for several)")
    return list(dict.fromkeys(fmts))


def apply(model_name: str, spec_paths: list[str], out: str | Path, dtype: str = "float32", force: bool = False,
          strength: float | None = None, run_verify: bool = True, prompts: list[str] | None = None,
          check_model: bool = True, max_new_tokens: int = 32, log=print,
          formats: list[str] | None = None, insert_modules: bool = False,
          approximate: bool = False, inputs: tuple = (), onnx_layout: str = "root") -> ApplyResult:
    """Bake `spec_paths` into `model_name` and write `out`. `inputs`: more files the run reads (prompts)
    that `out` must not touch."""
    t0 = time.perf_counter()
    out = Path(out)
    formats = formats or ["safetensors"]
    if dtype not in st_exporter.DTYPES:
        raise BakeError(f"--dtype: unknown dtype {dtype!r} (known: {', '.join(st_exporter.DTYPES)})")
    if "onnx" in formats and dtype == "bfloat16":
        raise BakeError("--dtype bfloat16: not with --format onnx (ONNX Runtime's CPU kernels lack bfloat16; "
                        "use float32 or float16)")
    if onnx_layout not in ("root", "onnx"):
        raise BakeError(f"--onnx-layout: root (model.onnx beside config.json) or onnx (onnx/model.onnx, as "
                        f"transformers.js expects), got {onnx_layout!r}")
    specs = read_specs(spec_paths, strength)  # validated before any model is loaded
    reads = input_paths(specs, model_name, inputs)
    exporters.check_out(out, force, reads)
    loaded = load(model_name)
    exporters.check_out(out, force, [*reads, ("model directory", loaded.source)])
    if "onnx" in formats and loaded.tokenizer is not None:
        from .exporters import onnx as onnx_exporter

        onnx_exporter.check_supported(loaded.model)  # before any work
    from .models.diffusion import PipelineModel

    if isinstance(loaded.model, PipelineModel):
        return _apply_pipeline(loaded, model_name, specs, out, force, formats, run_verify, prompts, check_model,
                               insert_modules, log, t0)
    plan = bind(specs, loaded.model, check_model=check_model)
    plan.insert_modules = insert_modules
    plan.approximate = approximate
    plan.fold_dtype = torch.float64 if dtype == "float32" else torch.float32
    passes.run(plan)  # raises before anything is written if a map cannot fold
    for p, s, w in plan.report:
        log(f"  {p:22s} {s}: {w}")
    infos = [spec_info(s) for s in specs]
    with exporters.staged(out, force, log) as tmp:
        if "onnx" in formats:
            onnx_exporter.export(plan.model, loaded.tokenizer, tmp, dtype, log=log, layout=onnx_layout)
        if "safetensors" in formats:
            st_exporter.export(plan, loaded.tokenizer, tmp, dtype)
            if plan.inserted:
                from .modules import write_code

                write_code(tmp, type(plan.model).__name__)
        for what in portable.make_portable(tmp):  # older transformers and other runtimes read the same model
            plan.note("portable", "files", what)
            log(f"  {'portable':22s} files: {what}")
        del loaded  # verify reloads both models; never hold two copies while it runs
        plan.model = None
        gc.collect()
        verification = None
        if run_verify:
            verification = verify_mod.verify(lambda: _fresh(model_name), specs, tmp, prompts,
                                             max_new_tokens=max_new_tokens, check_model=check_model,
                                             formats=formats, trust_code=bool(plan.inserted))
            verification["approximate"] = approximate
            if not verification["passed"] and approximate:
                log(f"approximate: the baked model differs from the exact reference by {verification['max_rel']:.3g} "
                    f"(relative logit error), greedy identical {verification['greedy_same']}/{verification['prompts']}; "
                    f"written anyway, as asked")
            elif not verification["passed"]:
                raise CheckFailed(f"verify: baked model differs from the hooked reference "
                                  f"(max abs {verification['max_abs']:.3g}, relative {verification['max_rel']:.3g}, "
                                  f"greedy identical {verification['greedy_same']}/{verification['prompts']}); "
                                  f"nothing written to {out}")
        card.write_card(tmp, plan, infos, model_name, dtype, verification, formats)
    return ApplyResult(out, plan.report, plan.config_changes, verification, time.perf_counter() - t0)


def _fresh(model_name: str):
    loaded = load(model_name)
    return loaded.model, loaded.tokenizer


def _apply_pipeline(loaded, model_name, specs, out, force, formats, run_verify, prompts, check_model, insert_modules,
                    log, t0) -> ApplyResult:
    """The same pipeline for a diffusers pipeline: bind → passes → pipeline directory (+ ONNX denoiser)."""
    from .exporters import pipeline as pipe_exporter
    from .models.diffusion import load_pipeline
    from .verify_pipeline import verify_pipeline

    if insert_modules:
        raise BakeError("--insert-modules: not for diffusers pipelines yet (every default T2I site folds exactly)")
    if "onnx" in formats:
        from .exporters import onnx_denoiser

        onnx_denoiser.check_supported(loaded.model)  # before any work
    plan = bind(specs, loaded.model, check_model=check_model)
    passes.run(plan)
    for p, s, w in plan.report:
        log(f"  {p:22s} {s}: {w}")
    infos = [spec_info(s) for s in specs]
    source = Path(loaded.source)
    with exporters.staged(out, force, log) as tmp:
        comps = pipe_exporter.export(plan, source, tmp) if "safetensors" in formats else []
        if "onnx" in formats:
            onnx_denoiser.export(plan.model, tmp, log=log)
        if comps:
            plan.config_changes["components_rewritten"] = comps
        del loaded
        plan.model = None
        gc.collect()
        verification = None
        if run_verify:
            verification = verify_pipeline(lambda dt: load_pipeline(source, dt), specs, tmp, prompts or None,
                                           check_model=check_model)
            if not verification["passed"]:
                raise CheckFailed(f"verify: steered pipeline differs from the hooked reference "
                                  f"(latent relative error {verification.get('latent_rel', float('nan')):.3g}, "
                                  f"ONNX denoiser {verification.get('onnx_denoiser_rel', float('nan')):.3g}); "
                                  f"nothing written to {out}")
        card.write_card(tmp, plan, infos, model_name, "as stored", verification, formats)
    return ApplyResult(out, plan.report, plan.config_changes, verification, time.perf_counter() - t0)
