"""safetensors exporter: a complete transformers model directory that stock `from_pretrained` loads
with no custom code (config with the bias flags the folds need, weights, tokenizer, generation
config, and a model card naming the spec). With inserted modules, config.json names bake's own model
type and the generated classes: it loads only with trust_remote_code=True (`modules.mark_config`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..modules import mark_config
from ..passes import check_finite
from ..plan import Plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(plan: Plan, tokenizer, out: Path, dtype: str = "float32") -> None:
    model = plan.model
    model.to(DTYPES[dtype])
    check_finite(model.state_dict().items(), "the weights to write", dtype)
    model.config.dtype = dtype
    if plan.inserted:  # generated code builds the modules: from_pretrained(out, trust_remote_code=True)
        model.config.bake_inserted = plan.inserted
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if plan.inserted:  # bake's model type: a stock load refuses it instead of dropping the modules
        mark_config(out, model)
