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

OPTIMIZERS = ("adam", "sgd")


@dataclass
class LineasConfig:
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

    def check(self, n_source: int, n_target: int) -> None:
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
        if min(n_source, n_target) < 4:
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
    from . import distributed as dist

    cfg.check(len(source), len(target))
    if cfg.gated and (not control or len(control) < 4):
        raise BakeError("--control: joint DSAS training needs a control set of at least 4 texts")
    dev = next(model.parameters()).device
    tgt = collect(model, tok, target, infos, cfg.batch_size, desc="target activations", pooling=cfg.pooling,
                  progress=progress)
    tgt = {k: v.to(dev) for k, v in tgt.items()}
    world, rank = (torch.distributed.get_world_size(), dist.rank()) if dist.active() else (1, 0)
    n_micro = cfg.accumulate * world
    gens = [torch.Generator().manual_seed(cfg.seed + 7919 * j) for j in range(n_micro)]
    mine = list(range(rank, n_micro, world))
    maps = _Maps(infos, cfg.gated, dev)
    params = list(zip(maps.a, maps.b))
    gates = list(zip(maps.w, maps.c))
    if cfg.gated:
        ctrl = collect(model, tok, control, infos, cfg.batch_size, desc="control activations", pooling=cfg.pooling,
                       progress=progress)
        ctrl = {k: v.to(dev) for k, v in ctrl.items()}
        enc_ctrl = list(_batches(tok, control, len(control)))[0]
    runner = maps
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(maps, device_ids=[dev.index] if dev.type == "cuda" else None)
    flat = list(maps.parameters())
    opt = (torch.optim.Adam(flat, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(flat, lr=cfg.lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    pooled: list[torch.Tensor | None] = [None] * len(infos)
    mask_box: list[torch.Tensor] = []
    last = len(infos) - 1

    def make_hook(k, side):
        a, b = params[k]
        w, c = gates[k] if cfg.gated else (None, None)

        def apply(x):
            y = x * a.to(x.dtype) + b.to(x.dtype)
            if w is not None:
                g = torch.sigmoid(x @ w.to(x.dtype) + c.to(x.dtype)).unsqueeze(-1)
                y = x + g * (y - x)
            pooled[k] = pool_tokens(y.float(), mask_box[0], cfg.pooling)
            return y

        if side == "output":
            def hook(mod, args, out):
                if isinstance(out, tuple):
                    out = (apply(out[0]),) + tuple(out[1:])
                else:
                    out = apply(out)
                if k == last:
                    raise _Enough
                return out
            return hook

        def pre(mod, args, kwargs):
            if k == last:
                apply(args[0] if args else next(iter(kwargs.values())))
                raise _Enough
            if args:
                return (apply(args[0]),) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: apply(kwargs[key])}
        return pre

    handles = []
    for k, info in enumerate(infos):
        mod = model.get_submodule(info.module)
        if info.side == "output":
            handles.append(mod.register_forward_hook(make_hook(k, "output")))
        else:
            handles.append(mod.register_forward_pre_hook(make_hook(k, "input"), with_kwargs=True))
    enc_all = list(_batches(tok, source, len(source)))[0]

    def run_batch(enc, idx):
        ids, mask = enc.input_ids[idx], enc.attention_mask[idx]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width].to(dev), mask[:, :width].to(dev)
        mask_box[:] = [mask]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Enough:
            pass

    n = min(cfg.batch_size, len(source), len(target))  # equal counts on both sides of each W2

    def micro_loss(gen: torch.Generator) -> torch.Tensor:
        """The loss of one micro-batch, its samples drawn from `gen`."""
        idx = torch.randperm(len(source), generator=gen)[:n]
        run_batch(enc_all, idx)
        loss = 0.0
        for k, info in enumerate(infos):
            t = tgt[info.name]
            tidx = torch.randperm(t.shape[0], generator=gen)[:n].to(dev)
            loss = loss + w2_per_unit(pooled[k], t[tidx]).sum()
        if cfg.gated:  # retain: control texts should come out of every site as they went in
            cidx = torch.randperm(len(control), generator=gen)[:n]
            run_batch(enc_ctrl, cidx)
            for k, info in enumerate(infos):
                ref = ctrl[info.name][cidx.to(dev)]
                loss = loss + cfg.retain * ((pooled[k] - ref) ** 2).sum(-1).mean()
        return loss / len(infos)

    best, best_loss, ema, losses = None, float("inf"), None, []
    t0 = time.perf_counter()
    stopped = "steps"
    bar = tqdm(range(cfg.steps), desc="fit lineas", unit="step", disable=not progress)
    try:
        for step in bar:
            opt.zero_grad()
            total = torch.zeros((), device=dev)
            for i, j in enumerate(mine):
                sync = world == 1 or i == len(mine) - 1  # all-reduce once, after the last micro-batch
                with (contextlib.nullcontext() if sync else runner.no_sync()):
                    loss = runner(lambda: micro_loss(gens[j])) / len(mine)
                    loss.backward()
                total = total + loss.detach()
            late = bool(cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes)
            if world > 1:  # every rank sees the mean loss and stops at the same step
                both = torch.stack([total, torch.tensor(float(late), device=dev)])
                torch.distributed.all_reduce(both)
                total, late = both[0] / world, bool(both[1] > 0)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            for a, b in params:
                prox(a, b, cfg.l1, cfg.group, lr)
            val = float(total)
            losses.append(val)
            obj = val + penalty(params, cfg.l1, cfg.group)  # what the proximal steps minimise
            ema = obj if ema is None else 0.9 * ema + 0.1 * obj
            if step >= min(20, cfg.steps // 10) and ema < best_loss:
                best_loss = ema
                best = [(a.detach().clone(), b.detach().clone()) for a, b in params + gates]
            bar.set_postfix(loss=f"{val:.4g}", ema=f"{ema:.4g}")
            if late:
                stopped = "max-minutes"
                break
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), frozen):
            p.requires_grad_(g)
    if best is None:
        best = [(a.detach().clone(), b.detach().clone()) for a, b in params + gates]
    out = [{"a": a.float().cpu(), "b": b.float().cpu()} for a, b in best[:len(infos)]]
    for t, (w, c) in zip(out, best[len(infos):]):
        t["w"], t["c"] = w.float().cpu(), c.float().cpu()
    active_units = [int(((t["a"] != 1) | (t["b"] != 0)).sum()) for t in out]
    summary = {"steps_run": len(losses), "stopped_by": stopped, "seconds": round(time.perf_counter() - t0, 1),
               "loss_first": losses[0], "loss_last": losses[-1], "objective_best_ema": best_loss,
               "units": sum(i.units for i in infos), "active_units": sum(active_units),
               "sites": len(infos), "active_sites": sum(n > 0 for n in active_units),
               "processes": world, "micro_batches_per_step": n_micro}
    return out, summary
