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


def _op(seg: Map | LinearMap, strength: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One op dict (with tensor shapes) and its tensors, for a pending segment."""
    if isinstance(seg, LinearMap):
        if seg.is_diagonal:
            t = {"a": seg.diag, "b": seg.bias}
            op = {"op": "diag"}
        else:
            t = {"M": seg.dense(), "b": seg.bias}
            op = {"op": "dense"}
    elif seg.kind == "affine":
        t = {k: seg.tensors[k] for k in ("a", "b", "lo", "hi")}
        op = {"op": "affine", "strength": seg.strength if strength is None else strength}
    elif seg.kind == "monotone-pwl":
        t = {"xs": seg.tensors["xs"], "ys": seg.tensors["ys"]}
        op = {"op": "pwl", "strength": seg.strength if strength is None else strength}
    elif seg.kind == "gated" and seg.diagonal_step() is not None:
        d, b = seg.diagonal_step()  # T(x) − x = d⊙x + b: the reference's own ops (Map.diagonal_step)
        t = {"w": seg.tensors["w"], "c": seg.tensors["c"].reshape(1), "d": d, "b": b}
        op = {"op": "gated_diag", "strength": seg.strength}
    elif seg.kind == "gated":
        inner = seg.inner.with_strength(1.0).to_linear() if seg.inner.foldable else seg.inner
        iop, it = _op(inner, 1.0)
        t = {"w": seg.tensors["w"], "c": seg.tensors["c"].reshape(1)}
        op = {"op": "gated", "strength": seg.strength, "inner": [iop]}
        t.update({f"inner.{k}": v for k, v in it.items()})
    else:
        raise ValueError(seg.kind)
    tensors = {k: v.detach().to(torch.float32).cpu() for k, v in t.items()}
    op["tensors"] = {k: list(v.shape) for k, v in tensors.items() if not k.startswith("inner.")}
    return op, tensors


def insert(model: torch.nn.Module, module: str, side: str, pending: list) -> dict:
    """Install the pending segments as `module.bake_steer`; returns the config entry."""
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
    steer = model.get_submodule(module).bake_steer
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
