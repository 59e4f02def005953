"""LoRA export: projection maps as low-rank weight deltas, so a runtime's LoRA scale is the steering
strength (`--format lora`).

A projection y = x − λ·U(Uᵀx), U [d, r] orthonormal, at a Linear y = W x (no bias):

- at its output: (I − λUUᵀ) W = W + B A with B = −λ U [out, r], A = Uᵀ W [r, in];
- at its input:  W (I − λUUᵀ) = W + B A with B = −λ W U [out, r], A = Uᵀ [r, in].

Both are linear in λ: the adapter at scale s is the bake at strength λ·s. Written twice, with the
scale factor of each format set to 1 so the deltas are the ones above:

- PEFT (`lora/adapter_config.json` + `adapter_model.safetensors`): `lora_alpha` = r per module
  (`rank_pattern` / `alpha_pattern` where ranks differ), so PEFT's scaling α/r is 1;
- llama.cpp (`lora/adapter-F32.gguf`, where bake writes GGUF for the family): `adapter.lora.alpha` = 0,
  which llama.cpp reads as scale = the user's `--lora-scaled` factor, with no α/r.

Refused with the reason: any other map kind (its weight delta is not low-rank: it names the rank it
would need), more than one map at a site, a site that is no Linear's input or output, a Linear with a
bias that the projection would change (B A has no bias term)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BakeError

DIR = "lora"


def deltas(model: torch.nn.Module, adapter, specs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path → (A [r, in], B [out, r]) in float32, from the specs' maps on the original weights."""
    cat = adapter.sites(model)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs:
        for name, maps in spec.sites:
            A, B = _one(model, cat[name], name, maps)
            if cat[name].module in out:
                raise BakeError(f"--format lora: {cat[name].module} is steered at two sites; one low-rank delta "
                                f"per module (bake it instead)")
            out[cat[name].module] = (A, B)
    if not out:
        raise BakeError("--format lora: the spec steers no site")
    return out


def _one(model, info, name: str, maps) -> tuple[torch.Tensor, torch.Tensor]:
    live = [m for m in maps if m.strength != 0]
    if len(live) != 1 or live[0].kind != "projection":
        kinds = ", ".join(m.kind for m in live) or "none"
        raise BakeError(f"--format lora: site {name}: only one projection map per site is a low-rank delta "
                        f"(here: {kinds}; an affine or additive map changes W by a full-rank "
                        f"(rank {info.units}) delta or a bias): bake it instead")
    if info.role != "linear":
        raise BakeError(f"--format lora: site {name}: a LoRA changes a Linear's weight; this site is a "
                        f"{info.role} (put the projection on attn-out / mlp-out / mlp-in)")
    m = live[0]
    U = m.tensors["U"].double()
    lin = model.get_submodule(info.module)
    W = lin.weight.detach().double()
    if info.side == "output":
        if lin.bias is not None and float((U.T @ lin.bias.detach().double()).abs().max()) > 0:
            raise BakeError(f"--format lora: site {name}: {info.module} has a bias the projection changes "
                            f"(λUUᵀb); a LoRA has no bias term: bake it instead")
        A, B = U.T @ W, -m.strength * U
    else:
        A, B = U.T, -m.strength * (W @ U)
    return A.float().contiguous(), B.float().contiguous()


def write_peft(model: torch.nn.Module, parts: dict, out: Path, base: str) -> Path:
    """The PEFT adapter directory `out/lora`, written by PEFT itself (LoraConfig + get_peft_model)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise BakeError("--format lora: writing the PEFT adapter needs peft (pip install peft)") from e
    import copy

    ranks = {path: A.shape[0] for path, (A, _) in parts.items()}
    r = max(ranks.values())
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(parts), lora_dropout=0.0, bias="none",
                     rank_pattern={p: k for p, k in ranks.items() if k != r},
                     alpha_pattern={p: k for p, k in ranks.items() if k != r}, task_type="CAUSAL_LM")
    twin = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for path, (A, B) in parts.items():
            mod = twin.base_model.model.get_submodule(path)
            mod.lora_A["default"].weight.copy_(A)
            mod.lora_B["default"].weight.copy_(B)
    target = out / DIR
    twin.save_pretrained(str(target))
    conf = json.loads((target / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = base
    (target / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return target


def write_gguf(parts: dict, adapter, cfg, out: Path) -> Path:
    """llama.cpp's LoRA GGUF (the layout of its convert_lora_to_gguf.py): `<tensor>.lora_a` [r, in] and
    `<tensor>.lora_b` [out, r] per steered weight, alpha 0 (scale = the runtime's factor)."""
    from .gguf_lm import gguf_tensors, write_file

    arrays = {}
    for path, (A, B) in parts.items():
        # B's rows are W's rows: gguf_tensors names them and permutes q/k rows to llama.cpp's rotary layout
        (name, b), = gguf_tensors({f"{path}.weight": B}, adapter, cfg).items()
        arrays[f"{name}.lora_a"], arrays[f"{name}.lora_b"] = A.numpy(), b
    target = out / DIR / "adapter-F32.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)

    def metadata(w) -> None:
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)

    write_file(target, adapter.gguf_arch, metadata, arrays)
    return target
