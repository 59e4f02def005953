"""Inserted modules: what the passes could not fold stays a small module inside the model's forward
(no hooks). The module code lives in `bake/templates/modeling_bake.py`, which is also the file
written beside a checkpoint that needs it, so bake and the checkpoint run the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import BakeError
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


def mark_config(out: Path, model: torch.nn.Module) -> None:
    """config.json of a checkpoint with inserted modules: bake's model type `bake_<stock type>` (which
    only the generated code registers, so a stock `from_pretrained` without trust_remote_code=True
    refuses it instead of building the unsteered stock class), the `auto_map` to the generated config
    and model classes, and the generated class as the architecture (serving stacks refuse it too)."""
    path = Path(out) / "config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    stock = stock_type(doc) or doc["model_type"]
    doc["model_type"] = tpl.PREFIX + stock
    module = CODE.removesuffix(".py")
    doc["auto_map"] = {"AutoConfig": f"{module}.BakeConfig", "AutoModelForCausalLM": f"{module}.BakeForCausalLM"}
    doc["architectures"] = [f"Bake{type(model).__name__}"]
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stock_type(doc: dict) -> str | None:
    """The stock model type under a config's bake model type (None for any other config)."""
    mt = doc.get("model_type") if isinstance(doc, dict) else None
    if isinstance(mt, str) and mt.startswith(tpl.PREFIX) and len(mt) > len(tpl.PREFIX):
        return mt[len(tpl.PREFIX):]
    return None


def stock_config(path: str | Path):
    """The config in `path` as stock transformers reads it, without running any code: a checkpoint with
    inserted modules (model type `bake_<type>`) by the stock config class of its type (what the generated
    config class extends); any other directory with AutoConfig(trust_remote_code=False)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        doc = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    stock = stock_type(doc)
    if stock is None or stock not in CONFIG_MAPPING:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    fields = {k: v for k, v in doc.items() if k not in ("model_type", "auto_map", "architectures")}
    return CONFIG_MAPPING[stock].from_dict(fields)


def write_code(out: Path, base_class: str) -> None:
    """modeling_bake.py: the template, plus the stock classes it extends (the model class, and the config
    class of the stock type that `mark_config` put under bake's model type)."""
    src = Path(tpl.__file__).read_text(encoding="utf-8")
    doc = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    stock = stock_type(doc)
    if stock is None:
        raise BakeError(f"{Path(out) / 'config.json'}: model_type {doc.get('model_type')!r} is not bake's "
                        f"(write it with mark_config first)")
    src += (f"\n\nfrom transformers import {base_class} as BASE  # noqa: E402\n"
            f"from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402\n\n"
            f"BASE_CONFIG = CONFIG_MAPPING[{stock!r}]\n"
            f"BakeConfig = make_config(BASE_CONFIG, {stock!r})\n"
            f"BakeForCausalLM = make_class(BASE, BakeConfig)\n")
    (out / CODE).write_text(src, encoding="utf-8")


SIDE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def drop_foreign_code(out: Path) -> list[str]:
    """`auto_map` entries in an output's config and tokenizer files that name code bake did not write (the
    source model's own modules, or another hub repository's: `repo--module.Class`) are removed, so that
    trust_remote_code=True on a baked directory runs only bake's generated code. Returns what it removed."""
    done = []
    for name in SIDE_FILES:
        f = Path(out) / name
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # a side file copied as it was
            raise BakeError(f"{name}: not readable JSON ({e}); fix it in the model directory") from None
        if not isinstance(doc, dict) or "auto_map" not in doc or (name == "config.json" and _ours(out, doc)):
            continue
        del doc["auto_map"]
        f.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        done.append(f"{name}: auto_map removed (the source's own code: not carried into the output)")
    return done


def _ours(out: Path, doc: dict) -> bool:
    """config.json's auto_map is the one `mark_config` writes, for the generated code beside it."""
    am, module = doc.get("auto_map"), CODE.removesuffix(".py")
    return (needs_code(Path(out)) and isinstance(am, dict) and bool(am)
            and all(isinstance(v, str) and v.startswith(module + ".") for v in am.values()))


def needs_code(path: Path) -> bool:
    return (Path(path) / CODE).is_file()


__all__ = ["CODE", "drop_foreign_code", "insert", "mark_config", "needs_code", "stock_config", "stock_type",
           "write_code"]
