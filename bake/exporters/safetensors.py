"""safetensors exporter: a complete transformers model directory that stock `from_pretrained` loads
with no custom code (config with the bias flags the folds need, weights, tokenizer, generation
config, and a model card naming the spec)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..plan import Plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(plan: Plan, tokenizer, out: Path, dtype: str = "float32") -> None:
    model = plan.model
    model.to(DTYPES[dtype])
    model.config.dtype = dtype
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def write_card(out: Path, plan: Plan, specs_info: list[dict], model_name: str, dtype: str,
               verification: dict | None) -> None:
    """README.md (the model card) and bake_report.json (the same facts for machines)."""
    report = {
        "bake_version": __version__,
        "base_model": model_name,
        "dtype": dtype,
        "specs": specs_info,
        "config_changes": plan.config_changes,
        "passes": [{"pass": p, "site": s, "did": w} for p, s, w in plan.report],
        "verification": verification,
    }
    (out / "bake_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = [
        "---", "library_name: transformers", "tags: [bake, activation-steering]", "---", "",
        f"# {model_name}, steered with bake", "",
        "Activation steering baked into the weights: this checkpoint loads with stock "
        "`AutoModelForCausalLM.from_pretrained` and runs with no hooks and no custom code.", "",
        f"- base model: `{model_name}`", f"- dtype: {dtype}",
    ]
    for s in specs_info:
        lines.append(f"- spec `{s['file']}` (sha256 `{s['sha256'][:16]}…`), method `{s['method']}`, "
                     f"strengths {s['strengths']}, {s['sites']} site(s)")
    if plan.config_changes:
        lines.append("- config changes: " + ", ".join(f"`{k} = {v}`" for k, v in plan.config_changes.items())
                     + " (explicit zero biases are written for every companion module)")
    if verification:
        v = verification
        lines.append(f"- verified against bake's hooked reference on {v['prompts']} prompts: max abs logit error "
                     f"{v['max_abs']:.2e} (relative {v['max_rel']:.2e}), greedy continuations identical "
                     f"{v['greedy_same']}/{v['prompts']}: **{'pass' if v['passed'] else 'FAIL'}**")
    lines += ["", "## What was folded where", "", "| pass | site | what |", "|---|---|---|"]
    lines += [f"| {p} | `{s}` | {w} |" for p, s, w in plan.report]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
