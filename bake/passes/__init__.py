"""Compiler passes: plan → plan, one job each, in a fixed order. Each reports what it did per site
(`plan.report`). Passes read and write tensors through the plan's tensor store (`bake.store`); they
never write files.

`run` schedules them the same way for a loaded model and for a checkpoint on disk: canonicalize every
site, then the fold passes one group of sites at a time (sites that share no module; the store reads
the next group's tensors while this one folds and settles each group's writes), then the global
passes (grown MLPs, inserted modules, architecture rewrite)."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..maps import LinearMap
from ..plan import Plan, SitePlan
from ..store import check_finite
from . import (arch_rewrite, canonicalize, fold_consumers, fold_producer, grow_mlp, insert_modules, norm_shift,
               residual_additive)

FOLDS = (fold_producer, fold_consumers, norm_shift, residual_additive)
PIPELINE = (canonicalize, *FOLDS, grow_mlp, insert_modules, arch_rewrite)

__all__ = ["FOLDS", "PIPELINE", "check_finite", "run", "schedule", "writes"]


def run(plan: Plan) -> Plan:
    canonicalize.run(plan)
    grow_mlp.check(plan)
    groups = schedule(plan)
    start = len(plan.report)
    for k, group in enumerate(tqdm(groups, desc="bake", unit="group", leave=False, disable=len(groups) < 8)):
        if k == 0:
            plan.store.prefetch(_tensors(plan, group))
        if k + 1 < len(groups):
            plan.store.prefetch(_tensors(plan, groups[k + 1]))
        grow_mlp.take(plan, group)
        for p in FOLDS:
            p.run(plan, group)
        plan.store.flush()
    _pass_major(plan, start)
    grow_mlp.run(plan)
    insert_modules.run(plan)
    arch_rewrite.run(plan)
    plan.store.flush()
    plan.store.finish()
    return plan


def _modules(sites: list[SitePlan]) -> list[str]:
    out = []
    for sp in sites:
        out += [sp.info.module, *sp.info.consumers, *(s.param for s in sp.info.slots)]
        out += [sp.info.writer] if sp.info.writer else []
    return list(dict.fromkeys(out))


def schedule(plan: Plan) -> list[list[SitePlan]]:
    """Plan sites in groups that share no module (graph order inside each group, so the passes meet every
    module in the same order as when they run over all sites at once): sites touching a common module
    are joined. Groups are independent, so running the fold passes group by group changes no result."""
    groups: list[tuple[set[str], list]] = []
    for sp in plan.sites:
        mods = set(_modules([sp]))
        hit = [g for g in groups if g[0] & mods]
        merged = (mods.union(*(g[0] for g in hit)), [s for g in hit for s in g[1]] + [sp])
        groups = [g for g in groups if not any(g is h for h in hit)] + [merged]
    order = {id(sp): i for i, sp in enumerate(plan.sites)}
    return sorted((sorted(g[1], key=lambda s: order[id(s)]) for g in groups), key=lambda g: order[id(g[0])])


def writes(sp: SitePlan) -> list[str]:
    """The modules the fold passes may write for one canonicalized site: its own module, and a norm's
    consumers only when a shift or a dense map has to go into them (a residual site: its writer)."""
    info = sp.info
    if info.role == "residual":
        return [info.writer] if info.writer else []
    mods = [info.module]
    if info.role == "norm" and any(not isinstance(s, LinearMap) or not s.is_diagonal or not s.shift_is_zero
                                   for s in sp.pending):
        mods += list(info.consumers)
    return mods


def _tensors(plan: Plan, group: list[SitePlan]) -> list[str]:
    """The state-dict names of the parameters of every module a group's folds may write, and of the
    slots (expert weights) they may write."""
    mods = dict.fromkeys(m for sp in group for m in writes(sp))
    names = [f"{m}.{n}" for m in mods for n, _ in plan.model.get_submodule(m).named_parameters(recurse=False)]
    slots = [s for sp in group if sp.info.role in ("norm", "sum") for s in sp.info.slots]
    return names + [n for s in slots for n in (s.param, s.bias) if n and plan.store.has(n)]


def _pass_major(plan: Plan, start: int) -> None:
    """Order the fold passes' notes as one pass over all sites would have written them."""
    rank = {p.NAME: i for i, p in enumerate(FOLDS)}
    site = {sp.name: i for i, sp in enumerate(plan.sites)}
    notes = plan.report[start:]
    notes.sort(key=lambda n: (rank.get(n[0], len(rank)), site.get(n[1], len(site))))
    plan.report[start:] = notes
