"""Family adapters: Qwen2 and Mistral, Llama's graph in classes that hard-code some biases off.

Qwen2 builds q/k/v with a bias and o_proj, gate/up/down without; Mistral has no biases at all. A
fold that needs one of the missing biases relabels the checkpoint as Llama with `attention_bias` /
`mlp_bias` on (the same math; Qwen2's q/k/v biases survive). Folds that need no new bias keep the
original class.
"""

from __future__ import annotations

import torch

from .adapter import BiasGroup
from .llama import ATTN, MLP, TINY, LlamaAdapter, as_llama


class Qwen2Adapter(LlamaAdapter):
    def __init__(self, family: str = "qwen2", model_types: tuple[str, ...] = ("qwen2",)):
        super().__init__()
        self.family = family
        self.model_types = model_types
        self.bias_groups = (BiasGroup("attention_bias", ATTN, relabel="llama"),
                            BiasGroup("mlp_bias", MLP, relabel="llama"))

    def relabel(self, model: torch.nn.Module, flags: dict[str, bool]):
        return as_llama(model, flags)

    def tiny(self) -> torch.nn.Module:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


class MistralAdapter(Qwen2Adapter):
    def __init__(self):
        super().__init__("mistral", ("mistral",))

    def tiny(self) -> torch.nn.Module:
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)).eval()
