"""Next-token choice for runtimes with no `generate` of their own (ONNX Runtime, llama.cpp): transformers'
own logits processors (repetition penalty, min length, temperature, top-k, top-p) and torch's sampler,
so a steered model in another runtime samples as `model.generate` would from the same logits."""

from __future__ import annotations

import torch


def processors(prompt_len: int, eos: list[int], do_sample: bool, min_new_tokens: int = 0,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               repetition_penalty: float | None = None):
    """The `LogitsProcessorList` transformers' generate builds for these settings."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    procs = LogitsProcessorList()
    if repetition_penalty and repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, eos))
    if do_sample:
        if temperature and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def next_tokens(procs, seq: torch.Tensor, logits: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """[batch] next tokens from the last logits [batch, vocab] (float32) of the sequences `seq`."""
    scores = procs(seq, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0] if do_sample else scores.argmax(-1)


def eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])
