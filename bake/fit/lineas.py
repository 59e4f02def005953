"""LinEAS: all sites' per-unit affine maps trained jointly, end to end.

Parameters: per site a (init 1) and b (init 0), float32. Loss: for each site, the 1-D
Wasserstein-2 distance per unit between the pooled source activations *after* that site's map,
computed with every upstream map active (gradients flow through all of them), and the pooled
clean target activations (computed once, no grad), on sorted samples of equal count; summed over
units, averaged over sites. Adam or SGD with cosine decay; sparse group lasso by proximal steps
after every optimiser step (soft-threshold a − 1 and b per unit by lr·l1, then shrink each site's
vector [a − 1, b] towards 0 by lr·group·√d in L2), so units and whole sites become exactly the
identity, which the compiler's canonicalize pass then drops.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import BakeError
from .collect import _batches, _Enough, collect, pool_tokens
from ..typed import check_fields

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LineasConfig:
    """LinEAS training options (frozen; part of a FitConfig as its `lineas` field). `pooling` and
    `gated` are set by fit from the FitConfig (its pooling; DSAS --joint) and need not be given."""
    steps: int = 1000
    lr: float = 1e-2
    batch_size: int = 8
    optimizer: str = "adam"
    l1: float = 0.0
    group: float = 0.0
    seed: int = 0
    max_minutes: float | None = None
    pooling: str = "mean"
    gated: bool = False  # DSAS --joint: train a gate σ(w·x + c) per site with the map
    retain: float = 1.0  # weight of the term keeping control activations unchanged (gated only)
    accumulate: int = 1  # micro-batches per step and process (gradient accumulation)

    def __post_init__(self) -> None:
        check_fields(self, "lineas.")

    def check(self, n_source: int | None = None, n_target: int | None = None) -> None:
        """Bad options raise a BakeError naming the CLI flag; the text counts are checked when given."""
        if self.steps < 1:
            raise BakeError(f"--steps: must be at least 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BakeError(f"--lr: must be a positive number, got {self.lr}")
        if self.batch_size < 4:
            raise BakeError(f"--batch-size: LinEAS needs at least 4 samples per batch, got {self.batch_size}")
        if self.accumulate < 1:
            raise BakeError(f"--accumulate: must be at least 1, got {self.accumulate}")
        if self.optimizer not in OPTIMIZERS:
            raise BakeError(f"--optimizer: unknown optimizer {self.optimizer!r} (known: {', '.join(OPTIMIZERS)})")
        for name, v in (("--l1", self.l1), ("--group", self.group)):
            if not (math.isfinite(v) and v >= 0):
                raise BakeError(f"{name}: must be a number ≥ 0, got {v}")
        if n_source is not None and n_target is not None and min(n_source, n_target) < 4:
            raise BakeError(f"--source/--target: LinEAS needs at least 4 texts on each side "
                            f"({n_source} source, {n_target} target)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise BakeError(f"--max-minutes: must be positive, got {self.max_minutes}")


def prox(a: torch.Tensor, b: torch.Tensor, l1: float, group: float, lr: float) -> None:
    """In place: soft-threshold (a − 1) and b by lr·l1, then group-shrink [a − 1, b] by lr·group·√d."""
    with torch.no_grad():
        if l1 > 0:
            da = a - 1
            a.copy_(1 + torch.sign(da) * (da.abs() - lr * l1).clamp(min=0))
            b.copy_(torch.sign(b) * (b.abs() - lr * l1).clamp(min=0))
        if group > 0:
            v = torch.cat([a - 1, b])
            norm = v.norm()
            factor = (1 - lr * group * math.sqrt(a.numel()) / norm).clamp(min=0) if norm > 0 else norm * 0
            a.copy_(1 + (a - 1) * factor)
            b.copy_(b * factor)


def penalty(params, l1: float, group: float) -> float:
    """l1·Σ(|a − 1| + |b|) + group·Σ_sites √d·‖[a − 1, b]‖."""
    if not (l1 or group):
        return 0.0
    with torch.no_grad():
        tot = 0.0
        for a, b in params:
            v = torch.cat([a - 1, b])
            tot += l1 * float(v.abs().sum()) + group * math.sqrt(a.numel()) * float(v.norm())
    return tot


def w2_per_unit(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance per unit between two equal-size samples [n, d] → [d]."""
    return ((torch.sort(src, 0).values - torch.sort(tgt, 0).values) ** 2).mean(0)


class _Maps(torch.nn.Module):
    """The trained parameters: per site a, b (and a gate's w, c), so DistributedDataParallel can own them."""

    def __init__(self, infos, gated: bool, dev):
        super().__init__()
        self.a = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(i.units, device=dev)) for i in infos])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(i.units, device=dev)) for i in infos])
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(i.units, device=dev)) for i in infos] if gated else [])
        self.c = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, device=dev)) for i in infos] if gated else [])

    def forward(self, step):  # one micro-batch's loss; the frozen model runs inside `step`
        return step()


def train(model, tok, source: list[str], target: list[str], infos, cfg: LineasConfig,
          progress: bool = True, control: list[str] | None = None) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Returns per site {a, b} (and {w, c} when gated) as CPU float32 in `infos` order, and a
    summary of the run. Gated (DSAS --joint): each site's output is x + σ(w·x + c)(a⊙x + b − x),
    and a retain term keeps the pooled activations of `control` texts where they were.

    A step averages the loss of `cfg.accumulate` micro-batches per process. Under torch.distributed
    (torchrun) the maps are wrapped in DistributedDataParallel and rank r runs micro-batches r, r + w,
    …: micro-batch j always draws its samples from its own seeded generator, so W ranks equal one
    process with `accumulate` × W micro-batches (gradients all-reduced, the same optimiser state on
    every rank)."""
    cfg.check(len(source), len(target))
    if cfg.gated and (not control or len(control) < 4):
        raise BakeError("--control: joint DSAS training needs a control set of at least 4 texts")
    run = _Run(model, tok, source, target, infos, cfg, progress, control)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handles = run.hook_sites()
    try:
        run.loop()
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), frozen):
            p.requires_grad_(g)
    return run.result()


class _Run:
    """One LinEAS training run: the samples, the maps and their optimiser, the hooks that apply the
    maps at the sites (pooling each site's output for the loss), and the step loop."""

    def __init__(self, model, tok, source, target, infos, cfg: LineasConfig, progress, control):
        from . import distributed as dist

        self.model, self.source, self.control, self.infos, self.cfg = model, source, control, infos, cfg
        self.progress = progress
        self.dev = dev = next(model.parameters()).device
        tgt = collect(model, tok, target, infos, cfg.batch_size, desc="target activations", pooling=cfg.pooling,
                      progress=progress)
        self.tgt = {k: v.to(dev) for k, v in tgt.items()}
        self.world, self.rank = (torch.distributed.get_world_size(), dist.rank()) if dist.active() else (1, 0)
        self.n_micro = cfg.accumulate * self.world
        self.gens = [torch.Generator().manual_seed(cfg.seed + 7919 * j) for j in range(self.n_micro)]
        self.mine = list(range(self.rank, self.n_micro, self.world))
        self.maps = _Maps(infos, cfg.gated, dev)
        self.params, self.gates = list(zip(self.maps.a, self.maps.b)), list(zip(self.maps.w, self.maps.c))
        if cfg.gated:
            ctrl = collect(model, tok, control, infos, cfg.batch_size, desc="control activations",
                           pooling=cfg.pooling, progress=progress)
            self.ctrl = {k: v.to(dev) for k, v in ctrl.items()}
            self.enc_ctrl = list(_batches(tok, control, len(control)))[0]
        self.runner = self.maps
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.runner = DistributedDataParallel(self.maps, device_ids=[dev.index] if dev.type == "cuda" else None)
        flat = list(self.maps.parameters())
        self.opt = (torch.optim.Adam(flat, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(flat, lr=cfg.lr))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps)
        self.pooled: list[torch.Tensor | None] = [None] * len(infos)
        self.mask: torch.Tensor | None = None
        self.enc_all = list(_batches(tok, source, len(source)))[0]
        self.n = min(cfg.batch_size, len(source), len(target))  # equal counts on both sides of each W2

    def hook_sites(self) -> list:
        """Register the map of every site on the frozen model; returns the hook handles."""
        handles = []
        for k, info in enumerate(self.infos):
            mod = self.model.get_submodule(info.module)
            if info.side == "output":
                handles.append(mod.register_forward_hook(self._output_hook(k)))
            else:
                handles.append(mod.register_forward_pre_hook(self._input_hook(k), with_kwargs=True))
        return handles

    def _apply(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Site k's (gated) map on its activations x; records the pooled result for the loss."""
        a, b = self.params[k]
        y = x * a.to(x.dtype) + b.to(x.dtype)
        if self.cfg.gated:
            w, c = self.gates[k]
            g = torch.sigmoid(x @ w.to(x.dtype) + c.to(x.dtype)).unsqueeze(-1)
            y = x + g * (y - x)
        self.pooled[k] = pool_tokens(y.float(), self.mask, self.cfg.pooling)
        return y

    def _output_hook(self, k: int):
        """A forward hook applying site k's map to a module's output; the last site ends the forward."""
        last = len(self.infos) - 1

        def hook(mod, args, out):
            out = (self._apply(k, out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else self._apply(k, out)
            if k == last:
                raise _Enough
            return out
        return hook

    def _input_hook(self, k: int):
        """A forward pre-hook applying site k's map to a module's first input; the last site ends the forward."""
        last = len(self.infos) - 1

        def pre(mod, args, kwargs):
            if k == last:
                self._apply(k, args[0] if args else next(iter(kwargs.values())))
                raise _Enough
            if args:
                return (self._apply(k, args[0]),) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: self._apply(k, kwargs[key])}
        return pre

    def _forward(self, enc, idx) -> None:
        """Run the texts `idx` of the encoded batch `enc` up to the last site (the hooks pool)."""
        ids, mask = enc.input_ids[idx], enc.attention_mask[idx]
        width = int(mask.sum(1).max())
        ids, self.mask = ids[:, :width].to(self.dev), mask[:, :width].to(self.dev)
        try:
            self.model(input_ids=ids, attention_mask=self.mask, use_cache=False)
        except _Enough:
            pass

    def micro_loss(self, gen: torch.Generator) -> torch.Tensor:
        """The loss of one micro-batch, its samples drawn from `gen`."""
        n, dev = self.n, self.dev
        idx = torch.randperm(len(self.source), generator=gen)[:n]
        self._forward(self.enc_all, idx)
        loss = 0.0
        for k, info in enumerate(self.infos):
            t = self.tgt[info.name]
            tidx = torch.randperm(t.shape[0], generator=gen)[:n].to(dev)
            loss = loss + w2_per_unit(self.pooled[k], t[tidx]).sum()
        if self.cfg.gated:  # retain: control texts should come out of every site as they went in
            cidx = torch.randperm(len(self.control), generator=gen)[:n]
            self._forward(self.enc_ctrl, cidx)
            for k, info in enumerate(self.infos):
                ref = self.ctrl[info.name][cidx.to(dev)]
                loss = loss + self.cfg.retain * ((self.pooled[k] - ref) ** 2).sum(-1).mean()
        return loss / len(self.infos)

    def _step_loss(self) -> torch.Tensor:
        """This process's micro-batches of one step, gradients accumulated (all-reduced once, at the end)."""
        total = torch.zeros((), device=self.dev)
        for i, j in enumerate(self.mine):
            sync = self.world == 1 or i == len(self.mine) - 1
            with (contextlib.nullcontext() if sync else self.runner.no_sync()):
                loss = self.runner(lambda: self.micro_loss(self.gens[j])) / len(self.mine)
                loss.backward()
            total = total + loss.detach()
        return total

    def loop(self) -> None:
        """The optimiser steps, each followed by the proximal steps; keeps the maps of the best
        smoothed objective and stops after `steps` or, cleanly, after `max_minutes`."""
        cfg = self.cfg
        self.best, self.best_loss, ema, self.losses = None, float("inf"), None, []
        self.t0, self.stopped = time.perf_counter(), "steps"
        bar = tqdm(range(cfg.steps), desc="fit lineas", unit="step", disable=not self.progress)
        for step in bar:
            self.opt.zero_grad()
            total = self._step_loss()
            late = bool(cfg.max_minutes and time.perf_counter() - self.t0 > 60 * cfg.max_minutes)
            if self.world > 1:  # every rank sees the mean loss and stops at the same step
                both = torch.stack([total, torch.tensor(float(late), device=self.dev)])
                torch.distributed.all_reduce(both)
                total, late = both[0] / self.world, bool(both[1] > 0)
            self.opt.step()
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            for a, b in self.params:
                prox(a, b, cfg.l1, cfg.group, lr)
            val = float(total)
            self.losses.append(val)
            obj = val + penalty(self.params, cfg.l1, cfg.group)  # what the proximal steps minimise
            ema = obj if ema is None else 0.9 * ema + 0.1 * obj
            if step >= min(20, cfg.steps // 10) and ema < self.best_loss:
                self.best_loss = ema
                self.best = [(a.detach().clone(), b.detach().clone()) for a, b in self.params + self.gates]
            bar.set_postfix(loss=f"{val:.4g}", ema=f"{ema:.4g}")
            if late:
                self.stopped = "max-minutes"
                break

    def result(self) -> tuple[list[dict[str, torch.Tensor]], dict]:
        """The best maps as CPU float32 per site, and the run's summary."""
        infos = self.infos
        best = self.best or [(a.detach().clone(), b.detach().clone()) for a, b in self.params + self.gates]
        out = [{"a": a.float().cpu(), "b": b.float().cpu()} for a, b in best[:len(infos)]]
        for t, (w, c) in zip(out, best[len(infos):]):
            t["w"], t["c"] = w.float().cpu(), c.float().cpu()
        active_units = [int(((t["a"] != 1) | (t["b"] != 0)).sum()) for t in out]
        losses = self.losses
        return out, {"steps_run": len(losses), "stopped_by": self.stopped,
                     "seconds": round(time.perf_counter() - self.t0, 1),
                     "loss_first": losses[0], "loss_last": losses[-1], "objective_best_ema": self.best_loss,
                     "units": sum(i.units for i in infos), "active_units": sum(active_units),
                     "sites": len(infos), "active_sites": sum(n > 0 for n in active_units),
                     "processes": self.world, "micro_batches_per_step": self.n_micro}


SITE_AVERAGING = ("mean over sites of the per-unit W2 sums (the LinEAS paper sums over sites: its "
                  "l1/group weights = the number of sites × these)")


def fit_lineas(job, meth=None):
    """The LinEAS fitter: train every chosen site's map jointly and record the run in the spec."""
    from ..maps import Map
    from .job import check_finite

    cfg = job.config.training(job.pooling)
    tensors, summary = train(job.model, job.tok, job.source, job.target, job.infos, cfg, progress=job.progress)
    for info, t in zip(job.infos, tensors):
        check_finite(t, info.name)
        job.spec.sites.append((info.name, [Map("affine", job.strength, t)]))
    job.spec.params.update({"steps": cfg.steps, "lr": cfg.lr, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size,
                            "accumulate": cfg.accumulate, "l1": cfg.l1, "group": cfg.group, "seed": cfg.seed,
                            "max_minutes": cfg.max_minutes, "loss": SITE_AVERAGING, "run": summary})
    return job.spec


def validate(c, counts) -> None:
    """LinEAS's own options (its LineasConfig), and with `counts` at least 4 texts per side."""
    c.training().check(*((counts.source, counts.target) if counts else ()))


def report(spec, c) -> list[str]:
    """What `bake fit` prints after a LinEAS (or DSAS --joint) fit: the run, and a warning if it did nothing."""
    r = spec.params["run"]
    lines = [f"lineas: {r['steps_run']} steps in {r['seconds']} s ({r['stopped_by']}), loss {r['loss_first']:.4g} → "
             f"{r['loss_last']:.4g}; active units {r['active_units']}/{r['units']}, "
             f"active sites {r['active_sites']}/{r['sites']}"]
    if r["active_units"] == 0:
        lines.append("lineas: warning: every unit is the identity, so the spec does nothing; lower --l1/--group")
    return lines
