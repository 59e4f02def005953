"""Family adapter: Gemma-2 and Gemma-3 text models.

Per decoder layer:
  input_layernorm ─▶ q, k, v ─▶ attention ─▶ o_proj ─▶ post_attention_layernorm ─▶ (+ residual)
  pre_feedforward_layernorm ─▶ gate, up ─▶ down_proj ─▶ post_feedforward_layernorm ─▶ (+ residual)
Norms scale by (1 + weight). `attention_bias` turns on q/k/v/o biases; the MLP's Linear layers are
built with bias=False, so no shift can fold into them. The post-attention and post-feedforward
norms (AcT's Gemma sites) write straight into the residual stream: there only a per-unit scale
folds (into the norm weight); a shift there has no bias slot in stock Gemma.
"""

from __future__ import annotations

import torch

from .adapter import Adapter, BiasGroup, SiteInfo
from .llama import TINY

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


class GemmaAdapter(Adapter):
    def __init__(self):
        super().__init__(
            family="gemma",
            model_types=("gemma2", "gemma3_text"),
            presets={
                "post-norms": ("model.layers.*.post_attention_layernorm:output",
                               "model.layers.*.post_feedforward_layernorm:output"),
                "pre-norms": ("model.layers.*.input_layernorm:output", "model.layers.*.pre_feedforward_layernorm:output"),
                "mlp-in": ("model.layers.*.mlp.down_proj:input",),
                "attn-out": ("model.layers.*.self_attn.o_proj:output",),
                "mlp-out": ("model.layers.*.mlp.down_proj:output",),
                # ml-aura's AurA sites: the outputs of every MLP Linear
                "mlp-linears": ("model.layers.*.mlp.gate_proj:output", "model.layers.*.mlp.up_proj:output",
                                "model.layers.*.mlp.down_proj:output"),
                "residual": ("model.layers.*:output",),
            },
            bias_groups=(BiasGroup("attention_bias", ATTN),),
            norm_weight_offset=1.0,
        )

    def tiny(self) -> torch.nn.Module:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        return Gemma3ForCausalLM(Gemma3TextConfig(**TINY, sliding_window=8)).eval()

    def layer_sites(self, model: torch.nn.Module, p: str, h: int) -> list[SiteInfo]:
        return (self.attention_sites(model, p)
                + [self.norm_site(f"{p}.post_attention_layernorm", h),  # writes the residual stream
                   self.norm_site(f"{p}.pre_feedforward_layernorm", h, (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))]
                + self.mlp_sites(model, p)
                + [self.norm_site(f"{p}.post_feedforward_layernorm", h),  # writes the residual stream
                   SiteInfo(f"{p}:output", p, "output", "residual", h,  # no Linear writes last: no writer
                            anchor=f"{p}.post_feedforward_layernorm.weight")])
