"""fit on several processes with torch.distributed (`torchrun` / `accelerate launch`).

Each rank takes every world-size-th batch of the source, target and control sets (the batches of a
single-process run, so each text is pooled in the same batch as there), collects its
per-text pooled activations, and the per-site sample matrices are gathered on every rank (all-gather,
rank order), so every estimator sees the whole sample set: means and covariances alike, and AcT's
sorted samples exactly. Every rank then computes the same maps (causal estimation stays in step);
rank 0 writes the spec. Collectives time out after `BAKE_DIST_TIMEOUT` seconds (default 600), so a
rank that dies makes the others fail with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..errors import BakeError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …).
    gloo on CPU, NCCL on CUDA. Returns False when not launched that way."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise BakeError("distributed fit: this torch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=float(os.environ.get("BAKE_DIST_TIMEOUT", "600")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as e:  # a bad rendezvous: one clear line
        raise BakeError(f"distributed fit: cannot join the process group ({backend}): {str(e).splitlines()[0]}") from None
    return True


def local_device(device: str) -> str:
    """cuda → cuda:LOCAL_RANK under a launcher, so each rank has its own GPU."""
    if active() and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _indices(n: int, batch_size: int, r: int, w: int) -> list[int]:
    """Rank r's texts: whole batches r, r + w, r + 2w, … of the single-process batching, so every text
    is pooled in the same batch (same padding, same shapes) as in one process."""
    return [i for b in range(r, -(-n // batch_size), w) for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def shard(texts: list[str] | None, batch_size: int = 1) -> list[str] | None:
    if texts is None or not active():
        return texts
    part = [texts[i] for i in _indices(len(texts), batch_size, dist.get_rank(), dist.get_world_size())]
    if not part:
        raise BakeError(f"distributed fit: {len(texts)} texts in batches of {batch_size} cannot feed "
                        f"{dist.get_world_size()} ranks (lower --batch-size or the process count)")
    return part


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[n_local, …] on every rank → [n_total, …] (rank order) on every rank."""
    if not active():
        return x
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(sizes, n)
        most = int(max(s.item() for s in sizes))
        pad = torch.zeros((most,) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)
        pad[:x.shape[0]] = x.to(dev)
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad)
    except Exception as e:  # a peer died or timed out
        raise BakeError(f"distributed fit: rank {dist.get_rank()} lost its peers during a collective "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(x.device)


def unshard(x: torch.Tensor, n: int, batch_size: int = 1) -> torch.Tensor:
    """Rows gathered in rank order from `shard` back to text order."""
    if not active():
        return x
    w = dist.get_world_size()
    order = [i for r in range(w) for i in _indices(n, batch_size, r, w)]
    out = torch.empty_like(x)
    out[torch.tensor(order)] = x
    return out


def gather_texts(x: torch.Tensor, n: int, batch_size: int = 1) -> torch.Tensor:
    """Per-text rows of this rank's shard → all n texts' rows, in text order, on every rank."""
    return unshard(gather_rows(x), n, batch_size)


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
