"""Families derived by the probe (bake/families/probe.py): on the families that have a table, the
probe finds the same table; on decoders without one, random specs folded into the derived graph equal
the hooked reference, and what the probe cannot place is refused with the reason, never folded wrongly."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

from bake import passes
from bake.errors import BakeError
from bake.families import FAMILIES, adapter_for, by_name
from bake.families.probe import derive
from bake.maps import Map
from bake.plan import bind
from bake.runtime import steered
from bake.spec import Spec
from test_differential import random_spec

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def tiny(model_type: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.AutoConfig.for_model(model_type, **{**SMALL, **extra})
    model = getattr(tf, CAUSAL_LM[model_type])(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a wrong fold shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "qwen3"])
def test_probe_finds_the_hand_written_table(family):
    ad = by_name(family)
    torch.manual_seed(0)
    model = ad.tiny()
    got = derive(model)
    assert got.sites(model) == ad.sites(model)  # every site: role, units, consumers, residual writer, anchor
    assert got.norm_weight_offset == ad.norm_weight_offset and got.final_norm == ad.final_norm
    own = {g.flag: g.members for g in ad.bias_groups if g.relabel is None}  # relabels are not the probe's
    assert {g.flag: g.members for g in got.bias_groups} == own


def folded_vs_hooked(model, patterns: list[str], seed: int) -> float:
    spec = random_spec(model, patterns, seed)
    baked = copy.deepcopy(model)
    passes.run(bind([spec], baked, check_model=False))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        with steered(model, [spec], check_model=False):
            ref = model(ids).logits
        got = baked(ids).logits
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("model_type", ["granite", "starcoder2", "smollm3"])
def test_probed_family_bakes_exactly(model_type):
    """No table: the probe's graph carries random affine/additive/projection specs at every site."""
    model = tiny(model_type, seed=4)
    assert model_type not in {t for a in FAMILIES for t in a.model_types}
    assert adapter_for(model).about.startswith("derived by bake's probe")
    for k, patterns in enumerate((["post-norms"], ["attn-out", "mlp-out", "mlp-in"], ["residual"], ["**"])):
        assert folded_vs_hooked(model, patterns, 10 + k) <= 1e-5, patterns


def test_probe_refuses_what_it_cannot_place():
    """Cohere runs attention and MLP in parallel off one norm (b = a + o_attn + o_mlp: both write the
    stream); its class builds no bias for either, so a shift on the layer output is refused with the
    reason (an inserted module on request)."""
    model = tiny("cohere", seed=5)
    ad = adapter_for(model)
    assert ad.residual_writer == "mlp.down_proj" and "attn-out" in ad.presets
    with pytest.raises(BakeError, match="cannot fold exactly: the shift needs a bias on model.layers.0.mlp.down_proj"):
        folded_vs_hooked(model, ["residual"], 5)
    site = "model.layers.1.input_layernorm:output"  # a scale there folds into the norm weight
    a = 0.5 + torch.rand(32, generator=torch.Generator().manual_seed(6))
    spec = Spec([(site, [Map("affine", 1.0, {"a": a, "b": torch.zeros(32)})])], method="t")
    baked = copy.deepcopy(model)
    passes.run(bind([spec], baked, check_model=False))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with steered(model, [spec], check_model=False):
            ref = model(ids).logits
        assert float((baked(ids).logits - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_probe_refuses_a_meta_model():
    with torch.device("meta"):
        model = getattr(tf, CAUSAL_LM["granite"])(tf.AutoConfig.for_model("granite", **SMALL))
    with pytest.raises(BakeError, match="granite has no family table.*cannot stream"):
        adapter_for(model)
