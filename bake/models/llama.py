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

    def layer_sites(self, model: torch.nn.Module, p: str, h: int) -> list[SiteInfo]:
        return (self.attention_sites(model, p)
                + [self.norm_site(f"{p}.post_attention_layernorm", h, (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))]
                + self.mlp_sites(model, p)
                + [SiteInfo(f"{p}:output", p, "output", "residual", h, writer=f"{p}.mlp.down_proj",
                            anchor=f"{p}.mlp.down_proj.weight")])
