"""Streaming bake: a safetensors checkpoint (sharded or not) baked without ever loading the model.

The plan is built on the meta device from the config alone (shapes); the fingerprint hashes its
anchor tensors one at a time from disk. The passes then run one decoder layer at a time: only the
modules that layer's sites touch (the site's module, its consumers, its residual writer) are read
from disk, in float32, folded exactly as in memory (float64 arithmetic, cast back to the stored
dtype), and every changed tensor is spilled to a small file in the staging directory before the next
layer is read. At the end each source shard holding a changed tensor is rewritten tensor by tensor
(untouched tensors copied byte for byte), every other shard is copied or hard-linked, new biases go
to one extra shard, and the index, config, tokenizer and model card are written. Peak memory is
about one layer's touched modules in float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import exporters, passes
from .compile import ApplyResult, input_paths, read_specs, spec_info
from .errors import BakeError, CheckFailed
from .exporters import card, portable
from .exporters.shards import INDEX, SINGLE, Checkpoint, Entry, patch, place, spill, write_shard
from .models import resolve
from .plan import Plan, bind

EXTRA = "model-bake-extra.safetensors"
WEIGHT_FILES = (INDEX, SINGLE, "config.json", "README.md", "bake_report.json")


def is_sharded(source: Path | str) -> bool:
    return isinstance(source, Path) and (source / INDEX).is_file()


def meta_model(source: Path):
    """The model class built from config.json on the meta device: shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)  # never prompt
    except Exception as e:
        raise BakeError(f"--model: cannot read {source / 'config.json'}: {str(e).splitlines()[0]}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except ValueError as e:  # a model type transformers does not ship (its code would have to run)
        raise BakeError(f"--model: cannot build {config.model_type!r} from its config without running the "
                        f"checkpoint's own code: {str(e).splitlines()[0]}") from None
    return model.eval()


def _group(plan: Plan) -> list[list]:
    """Plan sites in groups that share no module (graph order inside each group, so the passes meet
    every module in the same order as in memory): sites that touch a common module are joined."""
    groups: list[tuple[set[str], list]] = []
    for sp in plan.sites:
        mods = set(_modules([sp]))
        hit = [g for g in groups if g[0] & mods]
        merged = (mods.union(*(g[0] for g in hit)), [s for g in hit for s in g[1]] + [sp])
        groups = [g for g in groups if not any(g is h for h in hit)] + [merged]
    order = {id(sp): i for i, sp in enumerate(plan.sites)}
    return sorted((sorted(g[1], key=lambda s: order[id(s)]) for g in groups), key=lambda g: order[id(g[0])])


def _modules(sites) -> list[str]:
    out = []
    for sp in sites:
        out += [sp.info.module, *sp.info.consumers] + ([sp.info.writer] if sp.info.writer else [])
    return list(dict.fromkeys(out))


def _needed(sp) -> list[str]:
    """The modules the fold passes will write for one canonicalized site: its own module, and a norm's
    consumers only when a shift or a dense map has to go into them (a residual site: its writer)."""
    from .maps import LinearMap

    info = sp.info
    if info.role == "residual":
        return [info.writer] if info.writer else []
    mods = [info.module]
    if info.role == "norm" and any(not isinstance(s, LinearMap) or not s.is_diagonal or not s.shift_is_zero
                                   for s in sp.pending):
        mods += list(info.consumers)
    return mods


def _read_group(model, ckpt: Checkpoint, mods: list[str]) -> dict[str, torch.Tensor]:
    """The stored tensors of these modules' parameters (run on a reader thread, ahead of the passes)."""
    out = {}
    for path in mods:
        for name, _ in model.get_submodule(path).named_parameters(recurse=False):
            full = f"{path}.{name}"
            if full not in ckpt.entries:
                raise BakeError(f"--model: tensor {full} is missing from the checkpoint")
            out[full] = ckpt.tensor(full)
    return out


def _materialize(model, raw: dict[str, torch.Tensor], path: str, lazy: set[str]) -> dict[str, tuple]:
    """Put a module's parameters (read by _read_group) in place: a Linear's as stored (the folds read
    W a block at a time and turn a tensor into float32 only to write it: `lazy`), others as float32;
    returns (id, version, stored tensor) per parameter, so that what the passes left untouched is known,
    and what they wrote is compared with the stored bytes, without reading either again."""
    mod = model.get_submodule(path)
    keep = isinstance(mod, torch.nn.Linear)
    if keep:
        lazy.add(path)
    seen = {}
    for name, p in list(mod.named_parameters(recurse=False)):
        full = f"{path}.{name}"
        t = raw.pop(full)
        prm = torch.nn.Parameter(t if keep else t.to(torch.float32), requires_grad=False)
        mod._parameters[name] = prm
        seen[full] = (id(prm), prm._version, t)
    return seen


def _release(model, path: str) -> None:
    mod = model.get_submodule(path)
    for name, p in list(mod.named_parameters(recurse=False)):
        mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)


@contextlib.contextmanager
def _background():
    """One worker thread; on the way out (an error too) queued work is dropped and running work
    finished, so the staging directory is never removed under a copy."""
    ex = ThreadPoolExecutor(1)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def apply_streaming(model_name: str, spec_paths: list[str], out: str | Path, force: bool = False,
                    strength: float | None = None, run_verify: bool = True, prompts: list[str] | None = None,
                    check_model: bool = True, max_new_tokens: int = 32, log=print, link: bool = False,
                    approximate: bool = False, inputs: tuple = ()) -> ApplyResult:
    t0 = time.perf_counter()
    out = Path(out)
    specs = read_specs(spec_paths, strength)
    reads = input_paths(specs, model_name, inputs)
    exporters.check_out(out, force, reads)
    source = resolve(model_name)
    if not isinstance(source, Path):
        raise BakeError(f"--model: streaming needs a local checkpoint directory, got the hub id {model_name!r} "
                        f"(download it first)")
    exporters.check_out(out, force, [*reads, ("model directory", source)])
    ckpt = Checkpoint(source)
    single = ckpt.index is None  # one file stays one file (new tensors join it; no index)
    # copier: shard copies; reader: the next group's tensors, read while this group folds
    with exporters.staged(out, force, log) as tmp, _background() as copier, _background() as reader:
        # without --link every shard of a sharded checkpoint is copied whole (a shard that changes is
        # patched in place afterwards), so the copies start now and run while the plan is built and folded
        early = {} if single or link else {f: copier.submit(place, source / f, tmp / f, False)
                                           for f in ckpt.files}
        model = meta_model(source)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        plan = bind(specs, model, check_model=check_model, tensor_of=lambda n: ckpt.tensor(n),
                    rows_of=lambda n, idx: ckpt.rows(n, idx))
        plan.approximate = approximate
        stored = {n: ckpt.dtype(n) for n in ckpt.entries}
        half = {torch.bfloat16, torch.float16}
        plan.fold_dtype = torch.float32 if any(d in half for d in stored.values()) else torch.float64
        infos = [spec_info(s) for s in specs]
        spill_dir = tmp / ".spill"
        spill_dir.mkdir()
        spilled: dict[str, Entry] = {}
        steps = [p for p in passes.PIPELINE if p is not passes.arch_rewrite]
        groups = _group(plan)
        subs = [Plan(model, plan.adapter, g, plan.specs, approximate=approximate, fold_dtype=plan.fold_dtype,
                     lazy=plan.lazy) for g in groups]
        needed = []
        for sub in subs:  # canonicalize touches no weight: it tells which modules the folds will write
            steps[0].run(sub)
            needed.append(list(dict.fromkeys(m for sp in sub.sites for m in _needed(sp))))
        # with --link: shards no fold can touch are linked, the others copied (on the copier thread)
        maybe = {f"{m}.{n}" for mods in needed for m in mods
                 for n, _ in model.get_submodule(m).named_parameters(recurse=False)}
        touched = {ckpt.entries[n].file.name for n in maybe if n in ckpt.entries}
        placed = early or ({} if single else {f: copier.submit(place, source / f, tmp / f, f not in touched)
                                               for f in ckpt.files})
        ahead = reader.submit(_read_group, model, ckpt, needed[0]) if groups else None
        for k, sub in enumerate(tqdm(subs, desc="stream bake", unit="group", leave=False)):
            mods = needed[k]
            raw = ahead.result()
            if k + 1 < len(groups):
                ahead = reader.submit(_read_group, model, ckpt, needed[k + 1])
            before = {}
            for m in mods:
                before.update(_materialize(model, raw, m, plan.lazy))
            del raw
            for p in steps[1:]:
                p.run(sub)
            plan.report += sub.report
            plan.biased |= sub.biased
            changed = {}
            for m in mods:
                mod = model.get_submodule(m)
                for name, prm in mod.named_parameters(recurse=False):
                    full = f"{m}.{name}"
                    ident, version, orig = before.get(full, (None, None, None))
                    if (ident, version) == (id(prm), prm._version):
                        continue  # never written by a pass
                    t = prm.detach().to(stored.get(full) or stored[f"{m}.weight"])
                    if orig is not None and orig.untyped_storage().data_ptr() == prm.untyped_storage().data_ptr():
                        orig = ckpt.tensor(full)  # written in place over the stored tensor: read it again
                    if orig is None or not torch.equal(t, orig):
                        changed[full] = t.contiguous()
                _release(model, m)
            passes.check_finite(changed.items(), "the folded weights", "the stored dtype")
            if changed:
                spilled.update(spill(changed, spill_dir / f"{k:05d}.safetensors"))
            del changed
        passes.arch_rewrite.run(plan)  # flags, relabel, companion biases (on the meta model)
        model = plan.model
        # tensors the rewritten model has that the checkpoint lacks: companion zero biases
        extra = {}
        for name, prm in model.named_parameters():
            if name in ckpt.entries or name in spilled or (tied and name == "lm_head.weight"):
                continue
            if not name.endswith(".bias"):
                raise BakeError(f"stream: the rewritten model has a tensor {name} that bake cannot write")
            weight = name[:-len(".bias")] + ".weight"
            extra[name] = torch.zeros(prm.shape, dtype=stored.get(weight, torch.float32))
        new_names = sorted(n for n in spilled if n not in ckpt.entries) + sorted(extra)
        if extra:
            spilled.update(spill(extra, spill_dir / "extra.safetensors"))
        # shards: patch or rewrite the touched ones; the others were copied or linked on the copier thread
        weight_map, total, how = {}, 0, {"rewritten": 0, "copied": 0, "linked": 0}
        done = {f: fut.result() for f, fut in placed.items()}
        for file in tqdm(ckpt.files, desc="write shards", unit="shard", leave=False):
            names = ckpt.names_in(file) + (new_names if single else [])
            changed = [n for n in names if n in spilled]
            if single and changed:
                total += write_shard(tmp / file, names, {n: spilled.get(n) or ckpt.entries[n] for n in names})
                how["rewritten"] += 1
            elif changed:
                for n in changed:
                    patch(tmp / file, ckpt.entries[n].start, spilled[n], n)
                total += sum(ckpt.entries[n].end - ckpt.entries[n].start for n in names)
                how["rewritten"] += 1
            else:
                if single:
                    done[file] = place(source / file, tmp / file, link)
                elif link and file in touched:  # copied in case it changed; it did not: a link after all
                    os.remove(tmp / file)
                    done[file] = place(source / file, tmp / file, link)
                how[done[file]] += 1
                total += sum(ckpt.entries[n].end - ckpt.entries[n].start for n in names)
            weight_map.update({n: file for n in names})
        if new_names and not single:
            total += write_shard(tmp / EXTRA, new_names, spilled)
            weight_map.update({n: EXTRA for n in new_names})
        shutil.rmtree(spill_dir)
        if not single:
            meta = dict((ckpt.index or {}).get("metadata", {}))
            meta["total_size"] = total
            (tmp / INDEX).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                                indent=2) + "\n", encoding="utf-8")
        for f in source.iterdir():  # tokenizer, generation config, …: as they are
            if f.is_file() and f.name not in WEIGHT_FILES and f.name not in ckpt.files and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
        model.config.save_pretrained(str(tmp))
        for what in portable.make_portable(tmp):
            plan.note("portable", "files", what)
        plan.note("stream", "shards", f"{how['rewritten']} rewritten, {how['copied']} copied, {how['linked']} "
                                      f"hard-linked; {len(new_names)} new tensor(s) in {EXTRA if new_names else '-'}")
        for p_, s_, w_ in plan.report:
            if p_ in ("architecture-rewrite", "stream", "portable"):
                log(f"  {p_:22s} {s_}: {w_}")
        verification = None
        if run_verify:
            from . import verify as verify_mod
            from .compile import _fresh

            verification = verify_mod.verify(lambda: _fresh(model_name), specs, tmp, prompts,
                                             max_new_tokens=max_new_tokens, check_model=check_model)
            if not verification["passed"]:
                raise CheckFailed(f"verify: baked model differs from the hooked reference (max abs "
                                  f"{verification['max_abs']:.3g}, relative {verification['max_rel']:.3g}); "
                                  f"nothing written to {out}")
        plan.model = None
        card.write_card(tmp, plan, infos, model_name, "as stored", verification, ["safetensors"])
    return ApplyResult(out, plan.report, plan.config_changes, verification, time.perf_counter() - t0)
