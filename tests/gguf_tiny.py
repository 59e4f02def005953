"""A tiny random-weight Qwen2 as a GGUF that llama.cpp and transformers' GGUF reader both load: the
hyperparameters of a 2-layer model, the tensors of a random transformers Qwen2 (q/k/v biases and norm
weights random too), and the tokenizer metadata of the embedded SmolLM2 GGUF (a GPT-2-style BPE, as
Qwen2's). Lets the tests run bake's GGUF writer for an architecture other than Llama in llama.cpp
without a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_qwen2_gguf(path: Path, seed: int = 0) -> Path:
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bake.exporters import gguf_lm
    from bake.families import adapter_for
    from bake.models import load

    donor = gguf.GGUFReader(str(gguf_lm.source_gguf(load("llama").source)))
    vocab = len(donor.fields["tokenizer.ggml.tokens"].contents())
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    arrays = gguf_lm.gguf_tensors(tensors, adapter_for(model), cfg)

    def metadata(w) -> None:
        for key, field in donor.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        w.add_name("tiny-qwen2")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_file_type(gguf_lm.TYPES["f32"])

    path.parent.mkdir(parents=True, exist_ok=True)
    gguf_lm.write_file(path, "qwen2", metadata, arrays)
    return path
