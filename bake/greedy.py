"""Whether a candidate's greedy continuation is the reference's, read off logits verify computes anyway.

Greedy decoding is a function of the prefix: token i+1 is the argmax (EOS masked: verify generates
exactly n tokens) of the logits after prompt + tokens 1..i. So the candidate, started on the same
prompt, generates the reference's continuation c if and only if, for every i, the argmax of its
logits after prompt + c[:i] is c[i+1] — and those are the logits verify computes over the reference's
sequence for the error check (the check speculative decoding makes).

- ONNX and llama.cpp candidates compute them along the generation path itself (the prompt at once,
  then one token at a time with the KV cache, `prefill_then_decode_logits`): the argmaxes are the
  generated tokens exactly; only an exact tie is left to a real run.
- A PyTorch candidate computes them in one teacher-forced forward, which rounds differently from
  generate's cached decode steps by some ε (float32 reordering). If the top-1 logit leads the
  runner-up by more than 2ε, the argmax is the same on both paths. ε is taken as
  ``GUARD × max(PATH_REL × max|logit|, measured |candidate − reference|)`` on that prompt: the rounding
  difference of two float32 paths through the same model is of the size of the candidate-vs-reference
  difference (measured on SmolLM2-135M, 8 probes × 32 tokens: cached vs teacher-forced logits differ by
  4.4–7.1e-5, 1.2–1.9e-6 of max|logit|; baked vs hooked by 4.2–8.2e-5), and `GUARD` leaves an order
  of magnitude to spare. A position under that margin, a
  generation config with logits processors of its own (a repetition penalty, suppressed tokens …)
  or a non-finite logit sends the prompt to a real `generate` instead.
"""

from __future__ import annotations

import torch

GUARD = 10.0
PATH_REL = 2e-6  # float32 cached-vs-teacher-forced difference, relative to max|logit| (measured above)
# generation-config fields that leave greedy decoding alone (verify overrides sampling, sets min/max length)
NEUTRAL = {"use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
           "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
           "_from_model_config", "transformers_version", "do_sample", "temperature", "top_p", "top_k",
           "max_length", "max_new_tokens", "min_length", "min_new_tokens", "cache_implementation"}


def eos_masked(model) -> list[int] | None:
    """The token ids the candidate's greedy run never picks (EOS, masked by min_new_tokens), or None
    where its generate applies processors this check does not model (then every prompt is run)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:  # bake's ONNX and llama.cpp runners: bake.sampling's processors, EOS from the config
        from .sampling import eos_ids

        return eos_ids(model.config)
    if set(gen.to_diff_dict()) - NEUTRAL:  # beams, penalties, suppressed tokens …
        return None
    eos = gen.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def settled(ref: dict, logits: torch.Tensor, eos: list[int], exact_path: bool) -> bool:
    """True when `logits` (the candidate's, over ref["seq"]) prove its greedy continuation is ref["seq"]'s."""
    if not bool(torch.isfinite(logits).all()):
        return False
    n_prompt, seq = ref["n_prompt"], ref["seq"]
    at = logits[n_prompt - 1:len(seq) - 1].clone()
    eos = [e for e in eos if 0 <= e < at.shape[-1]]  # an id beyond the vocabulary is never generated anyway
    if eos:
        at[:, eos] = -torch.inf
    top = at.topk(2, dim=-1)
    if not torch.equal(top.indices[:, 0], seq[n_prompt:].to(top.indices.device)):
        return False
    lead = top.values[:, 0] - top.values[:, 1]
    if exact_path:
        return bool((lead > 0).all())
    err = (logits - ref["logits"]).abs().max().item()
    eps = GUARD * max(PATH_REL * ref["logits"].abs().max().item(), err)
    return bool((lead > 2 * eps).all())
