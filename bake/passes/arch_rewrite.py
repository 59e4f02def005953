"""Pass 7: turn on the bias flags that the folds need, with explicit zero biases for every
companion module in every layer, so stock loaders (which create all biases of a flag) find them.

Where the family's class hard-codes `bias=False` (Qwen2's o_proj and MLP, Mistral everywhere), the
model is relabelled to the family whose class has the flags (Llama: the same math); verify then
proves the relabelled checkpoint equal to the hooked original."""

from __future__ import annotations

import copy

import torch

from ..errors import BakeError
from ..families.table import linear_dims
from ..plan import Plan

NAME = "architecture-rewrite"


def run(plan: Plan) -> None:
    _norm_flags(plan)
    groups = {}
    for path in sorted(plan.biased):
        g = plan.adapter.bias_group(path)
        groups[g.flag] = g
    if not groups:
        return
    groups = _valid(plan, groups)
    relabel = {g.relabel for g in groups.values()} - {None}
    if relabel:
        model, notes = plan.adapter.relabel(plan.model, {flag: True for flag in groups})
        before = type(plan.model).__name__
        plan.model = model
        plan.store.rebind(model)
        plan.config_changes["architectures"] = [type(model).__name__]
        plan.config_changes["model_type"] = model.config.model_type
        for g in plan.adapter.bias_groups:  # flags the relabel turned on to keep existing biases
            if getattr(model.config, g.flag, False):
                groups.setdefault(g.flag, g)
        plan.note(NAME, "config", f"relabelled {before} → {type(model).__name__} (the same math; its class has "
                                  f"the bias flags the folds need)" + "".join(f"; {n}" for n in notes))
    model = plan.model
    prefix = plan.adapter.layers_prefix()
    for flag, g in groups.items():
        setattr(model.config, flag, True)
        plan.config_changes[flag] = True
        added = 0
        for layer_idx in range(len(model.get_submodule(prefix))):
            for rel in g.members:
                path = f"{prefix}.{layer_idx}.{rel}"
                if not _exists(model, path):  # layers built unlike this one (dense then MoE)
                    continue
                if not plan.store.has(f"{path}.bias"):
                    out = linear_dims(model.get_submodule(path))[1]
                    plan.store.set(f"{path}.bias", torch.zeros(out, dtype=plan.store.out_dtype(f"{path}.weight")))
                    added += 1
        plan.note(NAME, "config", f"{flag} = true; {added} zero companion bias(es) written")


def _valid(plan: Plan, groups: dict) -> dict:
    """The bias groups to turn on: `groups`, or every group where the config class accepts the flags only
    together (InternLM3: attention_bias must equal mlp_bias); zero companions keep the math."""
    def ok(flags) -> bool:
        cfg = copy.deepcopy(plan.model.config)
        for f in flags:
            setattr(cfg, f, True)
        try:
            getattr(cfg, "validate", lambda: None)()
        except Exception:  # noqa: BLE001 - transformers' strict config validators raise their own types
            return False
        return True

    if ok(groups):
        return groups
    every = {**groups, **{g.flag: g for g in plan.adapter.bias_groups}}
    if ok(every):
        plan.note(NAME, "config", f"{', '.join(sorted(set(every) - set(groups)))} turned on too: "
                                  f"{type(plan.model.config).__name__} accepts the bias flags only together")
        return every
    raise BakeError(f"--model: {type(plan.model.config).__name__} does not accept the bias flag(s) "
                    f"{', '.join(sorted(groups))} the folds need; pass --insert-modules")


def _exists(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _norm_flags(plan: Plan) -> None:
    """Turn on a component's norm flag (PixArt: norm_elementwise_affine) and give every norm it controls
    weight 1 and bias 0, as the stock class then builds them."""
    from .fold_producer import enable_affine

    for comp, (flag, controlled) in plan.norm_flags.items():
        mod = plan.model.get_submodule(comp)
        added = 0
        for rel in sorted(controlled):
            norm = mod.get_submodule(rel)
            if getattr(norm, "weight", None) is None:
                enable_affine(norm)
                added += 1
        mod.register_to_config(**{flag: True})
        plan.config_changes[f"{comp}.{flag}"] = True
        plan.note(NAME, comp, f"{flag} = true; {added} companion norm(s) given weight 1 and bias 0")
