"""Shared fixtures: small random-weight Llama models with a small trained tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TEXTS = [
    "the cat sat on the mat", "a dog barked at the moon all night", "people are kind and helpful",
    "you are an idiot and i hate you", "we went to the market to buy bread", "this is the worst thing ever",
    "the weather is lovely today", "stupid people ruin everything", "she wrote a letter to her friend",
    "they said terrible things about him", "music fills the quiet room", "go away you fool",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def make_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 96, vocab: int = 400,
               tie: bool = True, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so that folds into them are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def _rough_norms(model, around: float = 1.0):
    with torch.no_grad():  # non-trivial norm weights and biases so that folds into them are tested
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_((around if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def make_family(family: str, seed: int = 0, layers: int = 2, **extra):
    """A small random causal LM of `family` (llama, qwen2, mistral, gpt2, qwen3) with a 400-token vocabulary."""
    import transformers as tf

    if family == "llama":
        return make_llama(seed=seed, layers=layers, **extra)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=layers, n_head=4, n_positions=256, **ids, **extra)
        return _rough_norms(tf.GPT2LMHeadModel(cfg))
    common = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    if family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **{"tie_word_embeddings": True, **extra}))
        with torch.no_grad():  # q/k/v biases that matter
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.copy_(0.3 * torch.randn_like(p))
        return _rough_norms(model)
    if family == "mistral":
        return _rough_norms(tf.MistralForCausalLM(tf.MistralConfig(**common, **{"sliding_window": None, **extra})))
    if family == "qwen3":  # per-head q/k norms that matter
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, **{"head_dim": 16, **extra}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.copy_(1 + 0.5 * torch.randn_like(p))
        return _rough_norms(model)
    raise ValueError(family)


def save_model(model, tok, path: Path) -> Path:
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    return save_model(make_llama(), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def stamp(spec, model):
    """The spec with the fingerprint of the model it was written for, as `bake fit` records it (a spec
    with no model block is refused without --ignore-fingerprint)."""
    from bake.families import adapter_for
    from bake.models import fingerprint

    cat = adapter_for(model).sites(model)
    spec.model = fingerprint(model, [cat[s] for s, _ in spec.sites if s in cat])
    return spec
