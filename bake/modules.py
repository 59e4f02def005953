"""Inserted modules: what the passes could not fold stays a small module inside the model's forward
(no hooks). The module code lives in `bake/templates/modeling_bake.py`, which is also the file
written beside a checkpoint that needs it, so bake and the checkpoint run the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .maps import LinearMap, Map
from .templates import modeling_bake as tpl

CODE = "modeling_bake.py"


def _linear_op(seg: LinearMap) -> tuple[dict, dict[str, torch.Tensor]]:
    """op `diag` (y = a⊙x + b) or `dense` (y = M x + b) for a folded segment."""
    if seg.is_diagonal:
        return {"op": "diag"}, {"a": seg.diag, "b": seg.bias}
    return {"op": "dense"}, {"M": seg.dense(), "b": seg.bias}


def _op(seg: Map | LinearMap, strength: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One op dict (with tensor shapes) and its tensors (float32, on the CPU), for a pending segment:
    a LinearMap is `diag` or `dense`; a Map becomes what its kind says (MapKind.to_op)."""
    if isinstance(seg, LinearMap):
        op, t = _linear_op(seg)
    else:
        op, t = seg.impl.to_op(seg, strength, _op)
    tensors = {k: v.detach().to(torch.float32).cpu() for k, v in t.items()}
    op["tensors"] = {k: list(v.shape) for k, v in tensors.items() if not k.startswith("inner.")}
    return op, tensors


def insert(model: torch.nn.Module, module: str, side: str, pending: list) -> dict:
    """Install the pending segments as the module's steering child for `side`; returns the config entry."""
    ops, values = [], {}
    for i, seg in enumerate(pending):
        op, t = _op(seg)
        ops.append(op)
        for k, v in t.items():
            if k.startswith("inner."):
                values[f"inner{i}.t0_{k[6:]}"] = v
            else:
                values[f"t{i}_{k}"] = v
    entry = {"module": module, "side": side, "ops": ops}
    tpl.install(model, [entry])
    steer = model.get_submodule(module).get_submodule(tpl.CHILD[side])
    ref = next(model.parameters())
    with torch.no_grad():
        for name, v in values.items():
            steer.get_buffer(name).data = v.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point()
                                               else torch.float32)
    return entry


def write_code(out: Path, base_class: str) -> None:
    """modeling_bake.py: the template, plus the stock base class it extends."""
    src = Path(tpl.__file__).read_text(encoding="utf-8")
    src += (f"\n\nfrom transformers import {base_class} as BASE  # noqa: E402\n\n"
            f"BakeForCausalLM = make_class(BASE)\n")
    (out / CODE).write_text(src, encoding="utf-8")


def needs_code(path: Path) -> bool:
    return (Path(path) / CODE).is_file()


__all__ = ["CODE", "insert", "needs_code", "write_code"]
