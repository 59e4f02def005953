"""verify reads a candidate's greedy continuation off its teacher-forced logits where they prove it
(bake.greedy): the continuations it reports must be the ones the candidate's own `generate` makes,
for candidates that agree with the reference and for ones that do not."""

from __future__ import annotations

import copy

import pytest
import torch

from bake.greedy import eos_masked
from bake.verify import PROBES, run_candidate, run_reference

from conftest import make_family

N = 12


def _perturbed(model, scale: float, seed: int = 1):
    """A copy of `model` with noise of `scale` on every weight: a candidate that disagrees a little."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 3e-2])
def test_read_off_continuations_are_the_generated_ones(tokenizer, family, scale):
    model = make_family(family)
    ref = run_reference(model, tokenizer, [], PROBES, N, check_model=False)
    cand = _perturbed(model, scale)
    fast = run_candidate(cand, tokenizer, ref, N, desc="fast")
    slow = run_candidate(cand, tokenizer, ref, N, desc="generated", run_greedy=True)
    assert all(g["greedy_run"] for g in slow)
    for f, s in zip(fast, slow):
        assert torch.equal(f["seq"], s["seq"]), (family, scale)
        assert torch.equal(f["logits"], s["logits"])
    read_off = sum(not g["greedy_run"] for g in fast)
    if scale == 0.0:  # the same model: its continuations are the reference's and nearly all read off
        assert read_off >= len(PROBES) - 2 and all(torch.equal(r["seq"], g["seq"]) for r, g in zip(ref, fast))
    if scale == 3e-2:  # a different model: what differs was generated, never read off
        differs = [not torch.equal(r["seq"], g["seq"]) for r, g in zip(ref, fast)]
        assert any(differs) and all(g["greedy_run"] for g, d in zip(fast, differs) if d)


def test_a_generation_config_with_its_own_processors_is_always_generated(tokenizer):
    model = make_family("llama")
    ref = run_reference(model, tokenizer, [], PROBES[:3], N, check_model=False)
    model.generation_config.repetition_penalty = 1.3
    assert eos_masked(model) is None
    got = run_candidate(model, tokenizer, ref, N, desc="penalised")
    assert all(g["greedy_run"] for g in got)
