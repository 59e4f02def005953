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
                "residual": ("model.layers.*:output",),
            },
            bias_groups=(BiasGroup("attention_bias", ATTN),),
            norm_weight_offset=1.0,
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

        def norm(path: str, consumers: tuple[str, ...] = ()):
            add(SiteInfo(f"{path}:output", path, "output", "norm", h, consumers=consumers, anchor=f"{path}.weight"))

        for i in range(n_layers):
            p = f"model.layers.{i}"
            qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
            norm(f"{p}.input_layernorm", qkv)
            for path in qkv + (f"{p}.self_attn.o_proj",):
                linear(path)
            norm(f"{p}.post_attention_layernorm")
            norm(f"{p}.pre_feedforward_layernorm", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))
            for x in ("gate", "up", "down"):
                linear(f"{p}.mlp.{x}_proj")
            norm(f"{p}.post_feedforward_layernorm")
            add(SiteInfo(f"{p}:output", p, "output", "residual", h, anchor=f"{p}.post_feedforward_layernorm.weight"))
        norm("model.norm")
        return out
