"""Family adapter: GPT-2 (GPT2LMHeadModel).

Per block, in graph order:
  ln_1 ─▶ attn.c_attn (fused q, k, v) ─▶ attention ─▶ attn.c_proj ─▶ (+ residual)
  ln_2 ─▶ mlp.c_fc ─▶ gelu ─▶ mlp.c_proj ─▶ (+ residual)
then ln_f ─▶ lm_head (tied to the token embedding). The projections are Conv1D modules that store
their weight transposed ([in, out]); every one has a bias, and the LayerNorms have a bias too, so
every affine map at a norm output, a projection's input or output, and every shift on the residual
stream folds into the stock architecture: no flag, no relabel.
"""

from __future__ import annotations

import torch

from .adapter import Adapter, SiteInfo


class GPT2Adapter(Adapter):
    def __init__(self):
        super().__init__(
            family="gpt2",
            model_types=("gpt2",),
            presets={
                "post-norms": ("transformer.h.*.ln_1:output", "transformer.h.*.ln_2:output"),
                "mlp-in": ("transformer.h.*.mlp.c_proj:input",),
                "attn-out": ("transformer.h.*.attn.c_proj:output",),
                "mlp-out": ("transformer.h.*.mlp.c_proj:output",),
                "mlp-linears": ("transformer.h.*.mlp.c_fc:output", "transformer.h.*.mlp.c_proj:output"),  # ml-aura's
                "residual": ("transformer.h.*:output",),
            },
            final_norm="transformer.ln_f",
        )

    def tiny(self) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()

    def layers_prefix(self) -> str:
        return "transformer.h"

    def layer_sites(self, model: torch.nn.Module, p: str, h: int) -> list[SiteInfo]:
        return ([self.norm_site(f"{p}.ln_1", h, (f"{p}.attn.c_attn",))]
                + self.linear_sites(model, f"{p}.attn.c_attn") + self.linear_sites(model, f"{p}.attn.c_proj")
                + [self.norm_site(f"{p}.ln_2", h, (f"{p}.mlp.c_fc",))]
                + self.linear_sites(model, f"{p}.mlp.c_fc") + self.linear_sites(model, f"{p}.mlp.c_proj")
                + [SiteInfo(f"{p}:output", p, "output", "residual", h, writer=f"{p}.mlp.c_proj",
                            anchor=f"{p}.mlp.c_proj.weight")])
