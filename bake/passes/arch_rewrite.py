"""Pass 7: turn on the bias flags that the folds need, with explicit zero biases for every
companion module in every layer, so stock loaders (which create all biases of a flag) find them."""

from __future__ import annotations

import torch

from ..plan import Plan

NAME = "architecture-rewrite"


def run(plan: Plan) -> None:
    groups = {}
    for path in sorted(plan.biased):
        g = plan.adapter.bias_group(path)
        groups[g.flag] = g
    model = plan.model
    for flag, g in groups.items():
        setattr(model.config, flag, True)
        plan.config_changes[flag] = True
        added = 0
        for layer_idx in range(len(model.get_submodule(plan.adapter.layers_prefix()))):
            for rel in g.members:
                lin = model.get_submodule(f"{plan.adapter.layers_prefix()}.{layer_idx}.{rel}")
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                              device=lin.weight.device))
                    added += 1
        plan.note(NAME, "config", f"{flag} = true; {added} zero companion bias(es) written")
