"""The model card (README.md) and bake_report.json written beside every bake output, whatever
its formats: what was folded where, config changes, and the verification against the reference."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..plan import Plan


def write_card(out: Path, plan: Plan, specs_info: list[dict], model_name: str, dtype: str,
               verification: dict | None, formats: list[str] | None = None) -> None:
    """README.md (the model card) and bake_report.json (the same facts for machines)."""
    report = {
        "bake_version": __version__,
        "base_model": model_name,
        "dtype": dtype,
        "formats": formats or ["safetensors"],
        "specs": specs_info,
        "config_changes": plan.config_changes,
        "inserted_modules": plan.inserted,
        "passes": [{"pass": p, "site": s, "did": w} for p, s, w in plan.report],
        "verification": verification,
    }
    (out / "bake_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if plan.adapter.modality == "text-to-image":
        return _pipeline_card(out, plan, specs_info, model_name, verification, formats or ["safetensors"])
    lines = [
        "---", "library_name: transformers", "tags: [bake, activation-steering]", "---", "",
        f"# {model_name}, steered with bake", "",
        "Activation steering baked into the weights: this checkpoint loads with stock "
        "`AutoModelForCausalLM.from_pretrained` and runs with no hooks and no custom code.", "",
    ] if "safetensors" in (formats or ["safetensors"]) else [
        "---", "library_name: onnx", "tags: [bake, activation-steering, onnx]", "---", "",
        f"# {model_name}, steered with bake (ONNX)", "",
    ]
    if "onnx" in (formats or []):
        lines += ["`model.onnx` is the same steered model as one decoder graph with a KV cache (Optimum's names: "
                  "`input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value` → `logits`, "
                  "`present.N.key/value`); run it with ONNX Runtime (CPU or CUDA execution provider).", ""]
    lines += [
        f"- base model: `{model_name}`", f"- dtype: {dtype}",
    ]
    for s in specs_info:
        lines.append(f"- spec `{s['file']}` (sha256 `{s['sha256'][:16]}…`), method `{s['method']}`, "
                     f"strengths {s['strengths']}, {s['sites']} site(s)")
    if plan.approximate:
        lines.append("- **approximate**: support-masked affine maps were folded as if their support were unbounded; "
                     "the verification line below measures the difference from the exact (hooked) spec")
    if plan.inserted:
        lines.append(f"- **needs `trust_remote_code=True`**: {len(plan.inserted)} site(s) hold maps that cannot fold "
                     "into weights (see the table below); `modeling_bake.py` (plain torch, read it first) builds them "
                     "as small modules inside the forward pass, on top of the stock class. The ONNX export, if any, "
                     "needs no code.")
    if plan.config_changes:
        lines.append("- config changes: " + ", ".join(f"`{k} = {v}`" for k, v in plan.config_changes.items())
                     + " (explicit zero biases are written for every companion module)")
    if verification:
        v = verification
        lines.append(f"- verified against bake's hooked reference on {v['prompts']} prompts: max abs logit error "
                     f"{v['max_abs']:.2e} (relative {v['max_rel']:.2e}), greedy continuations identical "
                     f"{v['greedy_same']}/{v['prompts']}: **{'pass' if v['passed'] else 'FAIL'}**"
                     + (f" ({v.get('format')})" if v.get("format") else ""))
        o = v.get("onnx")
        if o:
            lines.append(f"- ONNX verified the same way ({o.get('provider', 'ONNX Runtime')}): max abs logit error "
                         f"{o['max_abs']:.2e} (relative {o['max_rel']:.2e}), greedy identical "
                         f"{o['greedy_same']}/{o['prompts']}: **{'pass' if o['passed'] else 'FAIL'}**")
    lines += ["", "## What was folded where", "", "| pass | site | what |", "|---|---|---|"]
    lines += [f"| {p} | `{s}` | {w} |" for p, s, w in plan.report]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pipeline_card(out: Path, plan: Plan, specs_info: list[dict], model_name: str, verification: dict | None,
                   formats: list[str]) -> None:
    comps = plan.config_changes.get("components_rewritten", [])
    lines = ["---", "library_name: diffusers", "tags: [bake, activation-steering, text-to-image]", "---", "",
             f"# {model_name}, steered with bake", "",
             "Activation steering baked into the weights of the pipeline: it loads with stock "
             "`DiffusionPipeline.from_pretrained` and runs with no hooks and no custom code.", "",
             f"- components rewritten: {', '.join(f'`{c}`' for c in comps) or 'none'}; every other file is a "
             f"byte-for-byte copy of the original"]
    if "onnx" in formats:
        lines.append("- the denoiser is also exported as `<denoiser>/model.onnx` (one denoising call) for ONNX Runtime")
    for s in specs_info:
        lines.append(f"- spec `{s['file']}` (sha256 `{s['sha256'][:16]}…`), method `{s['method']}`, "
                     f"strengths {s['strengths']}, {s['sites']} site(s)")
    if verification:
        v = verification
        line = (f"- verified against bake's hooked pipeline on {v['prompts']} prompts, {v['steps']} denoising steps, "
                f"seed {v['seed']}:")
        if "latent_rel" in v:
            line += f" latent relative error {v['latent_rel']:.2e}, max pixel error {v['pixel_max_abs']:.2e}"
        if "onnx_denoiser_rel" in v:
            line += f"; ONNX denoiser relative error {v['onnx_denoiser_rel']:.2e}"
        lines.append(line + f": **{'pass' if v['passed'] else 'FAIL'}**")
    lines += ["", "## What was folded where", "", "| pass | site | what |", "|---|---|---|"]
    lines += [f"| {p} | `{s}` | {w} |" for p, s, w in plan.report]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
