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
                "residual": ("model.layers.*:output",),
            },
            bias_groups=(BiasGroup("attention_bias", ATTN), BiasGroup("mlp_bias", MLP)),
        )

    def sites(self, model: torch.nn.Module) -> dict[str, SiteInfo]:
        cfg = model.config
        h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
        out: dict[str, SiteInfo] = {}

        def add(info: SiteInfo):
            out[info.name] = info

        def linear(path: str):
            mod = model.get_submodule(path)
            add(SiteInfo(f"{path}:input", path, "input", "linear", mod.in_features, anchor=f"{path}.weight"))
            add(SiteInfo(f"{path}:output", path, "output", "linear", mod.out_features, anchor=f"{path}.weight"))

        for i in range(n_layers):
            p = f"model.layers.{i}"
            qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
            add(SiteInfo(f"{p}.input_layernorm:output", f"{p}.input_layernorm", "output", "norm", h,
                         consumers=qkv, anchor=f"{p}.input_layernorm.weight"))
            for path in qkv + (f"{p}.self_attn.o_proj",):
                linear(path)
            add(SiteInfo(f"{p}.post_attention_layernorm:output", f"{p}.post_attention_layernorm", "output", "norm",
                         h, consumers=(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
                         anchor=f"{p}.post_attention_layernorm.weight"))
            for x in ("gate", "up", "down"):
                linear(f"{p}.mlp.{x}_proj")
            add(SiteInfo(f"{p}:output", p, "output", "residual", h, writer=f"{p}.mlp.down_proj",
                         anchor=f"{p}.mlp.down_proj.weight"))
        # the final norm feeds lm_head, which has no bias and may share the embedding: scale only
        add(SiteInfo("model.norm:output", "model.norm", "output", "norm", h, anchor="model.norm.weight"))
        return out
