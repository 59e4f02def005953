"""Pipeline exporter: the steered pipeline directory. Every component the plan touched is saved
again (safetensors, in the dtype it was stored in); every other file is copied byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..plan import Plan


def touched_components(plan: Plan) -> list[str]:
    comps = set()
    for sp in plan.sites:
        comps.add(sp.info.module.split(".", 1)[0])
    return sorted(comps)


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype of a component's safetensors weights (the first floating tensor)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                t = fh.get_slice(key)
                dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.get_dtype())
                if dt is not None:
                    return dt
    return None


def export(plan: Plan, source: Path, out: Path) -> list[str]:
    """Copy `source` into `out`, then re-save the touched components there. Returns their names."""
    shutil.copytree(source, out, dirs_exist_ok=True, symlinks=False)
    comps = touched_components(plan)
    for name in comps:
        comp = plan.model.get_submodule(name)
        folder = out / name
        dtype = stored_dtype(source / name) or torch.float32
        shutil.rmtree(folder)
        if next(comp.parameters()).dtype != dtype:
            comp.to(dtype)
        comp.save_pretrained(str(folder), safe_serialization=True)
    return comps
