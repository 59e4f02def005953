"""A tiny random model of any causal-LM model type in transformers: two layers, hidden 32, four
heads, four experts; the config class's own defaults otherwise, and the few keys some types need to
build small (rotary dims, MLA ranks, hybrid layer periods). A hybrid whose first two layers hold no
attention layer gets 4, then 8 layers. Used by `bake families --type` and the family sweep; the
weights are random (exactness needs no training), the norm weights moved away from 1 so that a wrong
fold into them shows."""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..models.loading import exact_experts

SMALL = dict(vocab_size=448, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2, n_routed_experts=4)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
           head_dim=4, first_k_dense_replace=1, moe_intermediate_size=16, n_group=1, topk_group=1,
           num_key_value_heads=4)
OVERRIDES = {  # config keys a type needs beyond SMALL to build small; None drops a SMALL key
    "codegen": dict(rotary_dim=4, n_embd=32, n_head=4, n_layer=2, n_positions=64),
    "gptj": dict(rotary_dim=4, n_embd=32, n_head=4, n_layer=2, n_positions=64),
    "deepseek_v2": MLA, "deepseek_v3": MLA, "minicpm3": MLA, "glm4_moe_lite": MLA, "sarvam_mla": MLA,
    "youtu": MLA, "axk1": MLA, "axk2": MLA,
    "falcon": dict(head_dim=None),
    "nemotron_h": dict(moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, mamba_num_heads=4,
                       mamba_head_dim=8, n_groups=1, ssm_state_size=8),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
}
MAX_PARAMS = 20_000_000  # a config class that ignores the tiny widths builds its full size: refused


def build(model_type: str, **changes) -> torch.nn.Module:
    """The tiny model of `model_type` (its ForCausalLM class), after one forward pass; `changes` override
    config keys (e.g. a real tokenizer's vocab_size)."""
    for layers in (2, 4, 8):
        try:
            return _build(model_type, layers, changes)
        except ValueError as e:  # "get_seq_length ... only LinearAttention layers": no attention layer yet
            if "get_seq_length" not in str(e) or layers == 8:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _build(model_type: str, layers: int, changes: dict | None = None) -> torch.nn.Module:
    import transformers as tf
    from transformers.models.auto import modeling_auto as auto

    if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BakeError(f"--type: {model_type!r} is not a causal-LM model type of transformers {tf.__version__}")
    torch.manual_seed(0)
    keys = {**SMALL, "num_hidden_layers": layers, **OVERRIDES.get(model_type, {}), **(changes or {})}
    cfg = tf.AutoConfig.for_model(model_type, **{k: v for k, v in keys.items() if v is not None})
    cls = getattr(tf, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"the tiny config is not honoured: {n / 1e6:.0f} M parameters")
    model = exact_experts(cls(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    return model
