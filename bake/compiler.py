"""The compiler: one pipeline for every source (`bake.sources`):

    read specs → check --out → open the source → store → bind (plan) → passes → export (staged)
    → portable files → verify against the hooked reference → model card → rename into place.

A loaded model and a streamed checkpoint differ only in their tensor store and weight writer; every
pass and every other step is the same call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import exporters, guard, passes
from .errors import BakeError, CheckFailed
from .exporters import card, portable
from .models.loading import check_placement
from .options import BakeOptions, parse_formats
from .plan import Plan, bind
from .sources import open_source
from .spec import Spec, check_strength
from .spec import read as read_spec

__all__ = ["ApplyResult", "BakeOptions", "apply", "input_paths", "parse_formats", "read_specs", "spec_info"]


@dataclass
class ApplyResult:
    out: Path
    report: list[tuple[str, str, str]]
    config_changes: dict
    verification: dict | None
    seconds: float
    streamed: bool = False


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
    named (an alias's cached files too), more files (prompts)."""
    return [*guard.spec_inputs(specs), *guard.model_inputs(model_name, "model directory"),
            *guard.file_inputs(*(("input file", f) for f in extra))]


def apply(model_name: str, spec_paths: list[str], out: str | Path, options: BakeOptions | None = None,
          log=print, **changes) -> ApplyResult:
    """Bake `spec_paths` into `model_name` and write `out`. `changes` override fields of `options`."""
    t0 = time.perf_counter()
    opts = (options or BakeOptions()).replace(**changes)
    opts.check()
    check_placement(opts.device, opts.device_map)  # where verify runs
    out = Path(out)
    specs = read_specs(spec_paths, opts.strength)  # validated before any model is loaded
    reads = input_paths(specs, model_name, opts.inputs)
    exporters.check_out(out, opts.force, reads)
    source = open_source(model_name, opts)
    exporters.check_out(out, opts.force, [*reads, ("model directory", source.path)])
    source.check(opts)  # formats the source cannot write: refused before any work
    baked = source.prepare(specs, opts)  # the specs the weights take (a control-vector sidecar takes the rest)
    with exporters.staged(out, opts.force, log) as tmp:
        with source.store(tmp) as store:
            plan = _compile(source, baked, store, opts, log)
            source.export(plan, tmp, opts, log)
        for what in portable.make_portable(tmp):  # older transformers and other runtimes read the same model
            plan.note("portable", "files", what)
        _log(plan, source, log, after=True)
        source.release()
        verification = _verify(source, plan, specs, tmp, opts, out, log) if opts.run_verify else None
        plan.model = None
        card.write_card(tmp, plan, [spec_info(s) for s in specs], model_name, source.card_dtype(opts), verification,
                        list(opts.formats))
    return ApplyResult(out, plan.report, plan.config_changes, verification, time.perf_counter() - t0,
                       source.streamed)


def _compile(source, specs: list[Spec], store, opts: BakeOptions, log) -> Plan:
    """bind → passes; raises before anything is written if a map cannot fold."""
    plan = bind(specs, source.model, check_model=opts.check_model, store=store)
    plan.insert_modules = opts.insert_modules
    plan.approximate = opts.approximate
    plan.fold_dtype = source.fold_dtype(opts)
    passes.run(plan)
    _log(plan, source, log, after=False)
    return plan


def _log(plan: Plan, source, log, after: bool) -> None:
    """What the passes did, once they ran (every line); after the files are written, the portable-files
    lines, and for a streamed bake only what changed the files (it is large)."""
    for p, s, w in plan.report:
        shown = (source.shows(p) if source.streamed else p == "portable") if after else not source.streamed
        if shown:
            log(f"  {p:22s} {s}: {w}")


def _verify(source, plan: Plan, specs: list[Spec], tmp: Path, opts: BakeOptions, out: Path, log) -> dict:
    t0 = time.perf_counter()
    v = source.verify(plan, specs, tmp, opts)
    v["seconds"] = round(time.perf_counter() - t0, 2)
    if not v["passed"] and opts.approximate:
        log(f"approximate: the baked model differs from the exact reference by {v['max_rel']:.3g} "
            f"(relative logit error), greedy identical {v['greedy_same']}/{v['prompts']}; written anyway, as asked")
    elif not v["passed"]:
        raise CheckFailed(f"{source.failure(v)}; nothing written to {out}")
    return v
