"""Relabels: the same network as another family's class, for families whose classes hard-code some
biases off (Qwen2's o_proj and MLP, Mistral everywhere). The weights are moved, not copied."""

from __future__ import annotations

import torch


def as_llama(model: torch.nn.Module, flags: dict[str, bool]) -> tuple[torch.nn.Module, list[str]]:
    """The same network as a LlamaForCausalLM with bias flags (for families whose classes hard-code
    bias=False: Qwen2, Mistral). Weights are moved, not copied: the new model takes the old tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    old = model.config
    keep = set(LlamaConfig().to_dict()) - {"architectures", "model_type", "transformers_version", "_name_or_path"}
    kw = {k: v for k, v in old.to_dict().items() if k in keep}
    layer0 = model.get_submodule("model.layers.0")
    kw["head_dim"] = layer0.self_attn.head_dim
    kw["attention_bias"] = bool(flags.get("attention_bias") or layer0.self_attn.q_proj.bias is not None)
    kw["mlp_bias"] = bool(flags.get("mlp_bias") or layer0.mlp.down_proj.bias is not None)
    cfg = LlamaConfig(**kw, architectures=["LlamaForCausalLM"])
    notes = []
    window = getattr(old, "sliding_window", None)
    windowed = window is not None and (getattr(old, "use_sliding_window", True)
                                       and "sliding_attention" in (getattr(old, "layer_types", None) or ["sliding_attention"]))
    if windowed and window < old.max_position_embeddings:
        notes.append(f"Llama has no sliding window: equal to the original on sequences up to {window} tokens "
                     f"(the original's window), not beyond")
    if kw["attention_bias"] and layer0.self_attn.q_proj.bias is not None:
        notes.append("q/k/v biases kept")
    with torch.device("meta"):
        new = LlamaForCausalLM(cfg)
    state = model.state_dict()
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    bias_zero = [k for k in missing if k.endswith(".bias")]
    if unexpected or set(missing) - set(bias_zero) - {"lm_head.weight"}:
        raise RuntimeError(f"relabel to Llama: state dicts differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    ref = next(iter(state.values()))
    for name in bias_zero:  # companions of the flags the original lacks: explicit zeros
        mod = new.get_submodule(name.rsplit(".", 1)[0])
        mod.bias = torch.nn.Parameter(torch.zeros(mod.out_features, dtype=ref.dtype, device=ref.device))
    if cfg.tie_word_embeddings:
        new.tie_weights()
    elif "lm_head.weight" in missing:
        raise RuntimeError("relabel to Llama: lm_head.weight missing from an untied model")
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):  # rotary inv_freq etc. are not in the state dict
        if name not in old_buffers:
            raise RuntimeError(f"relabel to Llama: no value for buffer {name}")
        owner, _, attr = name.rpartition(".")
        (new.get_submodule(owner) if owner else new)._buffers[attr] = old_buffers[name].clone()
    new.eval()
    new.generation_config = model.generation_config
    return new, notes


RELABELS = {"llama": as_llama}
