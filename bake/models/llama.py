"""Family adapter: Llama-architecture causal LMs (LlamaForCausalLM; SmolLM2 is one).

Per decoder layer, in graph order:
  input_layernorm ─▶ q_proj, k_proj, v_proj ─▶ attention ─▶ o_proj ─▶ (+ residual)
  post_attention_layernorm ─▶ gate_proj, up_proj ─▶ act(gate)·up ─▶ down_proj ─▶ (+ residual)
`attention_bias` turns on the q, k, v and o biases together; `mlp_bias` gate, up and down.
"""

from __future__ import annotations

import torch

from .adapter import Adapter, BiasGroup, SiteInfo

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


class LlamaAdapter(Adapter):
    def __init__(self):
        super().__init__(
            family="llama",
            model_types=("llama",),
            presets={
                "post-norms": ("model.layers.*.input_layernorm:output", "model.layers.*.post_attention_layernorm:output"),
                "mlp-in": ("model.layers.*.mlp.down_proj:input",),
                "attn-out": ("model.layers.*.self_attn.o_proj:output",),
                "mlp-out": ("model.layers.*.mlp.down_proj:output",),
                # ml-aura's AurA sites: the outputs of every MLP Linear
                "mlp-linears": ("model.layers.*.mlp.gate_proj:output", "model.layers.*.mlp.up_proj:output",
                                "model.layers.*.mlp.down_proj:output"),
                "residual": ("model.layers.*:output",),
            },
            bias_groups=(BiasGroup("attention_bias", ATTN), BiasGroup("mlp_bias", MLP)),
        )

    def tiny(self) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**TINY)).eval()

    def layer_sites(self, model: torch.nn.Module, p: str, h: int) -> list[SiteInfo]:
        return (self.attention_sites(model, p)
                + [self.norm_site(f"{p}.post_attention_layernorm", h, (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))]
                + self.mlp_sites(model, p)
                + [SiteInfo(f"{p}:output", p, "output", "residual", h, writer=f"{p}.mlp.down_proj",
                            anchor=f"{p}.mlp.down_proj.weight")])


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
