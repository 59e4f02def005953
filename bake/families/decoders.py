"""The decoder families, one table each (see `table.Adapter` for the fields). Adding a family that
reads like one of these is one more table here (and its differential test); the registry in
`bake.families` picks it up everywhere: sites, presets, folds, relabel, `bake families`, ONNX."""

from __future__ import annotations

from .table import Adapter, BiasGroup, Norm, Tiny

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QKV = ATTN[:3]
TINY = (("vocab_size", 64), ("hidden_size", 16), ("intermediate_size", 24), ("num_hidden_layers", 2),
        ("num_attention_heads", 2), ("num_key_value_heads", 1), ("head_dim", 8), ("max_position_embeddings", 64))


def presets(layers: str, post_norms: tuple[str, ...], down: str, attn_out: str, mlp_linears: tuple[str, ...],
            **more) -> dict[str, tuple[str, ...]]:
    """The site presets every decoder family offers, by the family's module names."""
    at = lambda rel: f"{layers}.*.{rel}"  # noqa: E731
    return {"post-norms": tuple(at(f"{n}:output") for n in post_norms), **more,
            "mlp-in": (at(f"{down}:input"),), "attn-out": (at(f"{attn_out}:output"),),
            "mlp-out": (at(f"{down}:output"),),
            "mlp-linears": tuple(at(f"{m}:output") for m in mlp_linears),  # ml-aura's AurA sites
            "residual": (f"{layers}.*:output",)}


# llama.cpp's Llama loader (src/models/llama.cpp, create_tensor_qkv) takes these biases as optional tensors
LLAMA_CPP_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# Llama (SmolLM2 is one): input_layernorm ─▶ q, k, v ─▶ attention ─▶ o_proj ─▶ (+ residual);
# post_attention_layernorm ─▶ gate, up ─▶ act(gate)·up ─▶ down_proj ─▶ (+ residual).
# attention_bias turns on the q, k, v and o biases together; mlp_bias gate, up and down.
LLAMA_GRAPH = (Norm("input_layernorm", QKV), *ATTN, Norm("post_attention_layernorm", MLP[:2]), *MLP)
LLAMA = Adapter(
    family="llama", model_types=("llama",),
    presets=presets("model.layers", ("input_layernorm", "post_attention_layernorm"), "mlp.down_proj",
                    "self_attn.o_proj", MLP),
    bias_groups=(BiasGroup("attention_bias", ATTN), BiasGroup("mlp_bias", MLP)),
    graph=LLAMA_GRAPH, residual_writer="mlp.down_proj", tiny_model=Tiny("LlamaConfig", "LlamaForCausalLM", TINY),
    onnx_genai=True, gguf_arch="llama", gguf_biases=LLAMA_CPP_BIASES)

# Qwen2 and Mistral: Llama's graph in classes that hard-code some biases off (Qwen2 builds q/k/v with a
# bias and o_proj, gate/up/down without; Mistral has none). A fold that needs a missing bias relabels
# the checkpoint as Llama with attention_bias / mlp_bias on (the same math; Qwen2's q/k/v biases stay).
RELABELLED = (BiasGroup("attention_bias", ATTN, relabel="llama"), BiasGroup("mlp_bias", MLP, relabel="llama"))
QWEN2 = Adapter(
    family="qwen2", model_types=("qwen2",), presets=LLAMA.presets, bias_groups=RELABELLED, graph=LLAMA_GRAPH,
    residual_writer="mlp.down_proj", relabel_to="llama", tiny_model=Tiny("Qwen2Config", "Qwen2ForCausalLM", TINY),
    onnx_genai=True, gguf_arch="qwen2", gguf_biases=("attn_q", "attn_k", "attn_v"))  # relabelled: written as llama
MISTRAL = Adapter(
    family="mistral", model_types=("mistral",), presets=LLAMA.presets, bias_groups=RELABELLED, graph=LLAMA_GRAPH,
    residual_writer="mlp.down_proj", relabel_to="llama",
    tiny_model=Tiny("MistralConfig", "MistralForCausalLM", (*TINY, ("sliding_window", None))), onnx_genai=True)

# Gemma-2 / Gemma-3 text: norms scale by (1 + weight); post_attention_layernorm and
# post_feedforward_layernorm (AcT's Gemma sites) write straight into the residual stream: only a
# per-unit scale folds there. attention_bias turns on q/k/v/o biases; the MLP is built bias-free.
GEMMA = Adapter(
    family="gemma", model_types=("gemma2", "gemma3_text"),
    presets=presets("model.layers", ("post_attention_layernorm", "post_feedforward_layernorm"), "mlp.down_proj",
                    "self_attn.o_proj", MLP, **{"pre-norms": ("model.layers.*.input_layernorm:output",
                                                             "model.layers.*.pre_feedforward_layernorm:output")}),
    bias_groups=(BiasGroup("attention_bias", ATTN),), norm_weight_offset=1.0,
    graph=(Norm("input_layernorm", QKV), *ATTN, Norm("post_attention_layernorm"),
           Norm("pre_feedforward_layernorm", MLP[:2]), *MLP, Norm("post_feedforward_layernorm")),
    residual_writer=None, residual_anchor="post_feedforward_layernorm.weight",
    tiny_model=Tiny("Gemma3TextConfig", "Gemma3ForCausalLM", (*TINY, ("sliding_window", 8))))

# GPT-2: ln_1 ─▶ attn.c_attn (fused q, k, v) ─▶ attn.c_proj; ln_2 ─▶ mlp.c_fc ─▶ gelu ─▶ mlp.c_proj. Conv1D
# projections (weight stored [in, out]), every one with a bias, LayerNorms with a bias: every affine map
# at a norm, a projection's input or output and every shift on the residual stream folds, stock.
GPT2 = Adapter(
    family="gpt2", model_types=("gpt2",),
    presets=presets("transformer.h", ("ln_1", "ln_2"), "mlp.c_proj", "attn.c_proj", ("mlp.c_fc", "mlp.c_proj")),
    layers="transformer.h", final_norm="transformer.ln_f",
    graph=(Norm("ln_1", ("attn.c_attn",)), "attn.c_attn", "attn.c_proj", Norm("ln_2", ("mlp.c_fc",)), "mlp.c_fc",
           "mlp.c_proj"),
    residual_writer="mlp.c_proj",
    tiny_model=Tiny("GPT2Config", "GPT2LMHeadModel", (("vocab_size", 64), ("n_embd", 16), ("n_layer", 2),
                                                      ("n_head", 2), ("n_positions", 64), ("bos_token_id", 0),
                                                      ("eos_token_id", 0))),
    onnx_genai=True, mlp=None)  # gelu(c_fc x) feeds c_proj: no gated MLP for `units` maps

# Qwen3: Llama's graph plus per-head q/k RMSNorms inside attention (they read q_proj / k_proj outputs,
# so maps there fold into q_proj / k_proj as in Llama). attention_bias turns on q/k/v/o biases; the
# MLP is built bias-free and no other class has this math, so no relabel: shifts into the MLP are refused.
QWEN3 = Adapter(
    family="qwen3", model_types=("qwen3",), presets=LLAMA.presets, bias_groups=(BiasGroup("attention_bias", ATTN),),
    graph=LLAMA_GRAPH, residual_writer="mlp.down_proj", tiny_model=Tiny("Qwen3Config", "Qwen3ForCausalLM", TINY))

DECODERS = (LLAMA, QWEN2, MISTRAL, GEMMA, GPT2, QWEN3)
