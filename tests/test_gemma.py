"""Gemma-2/3: (1 + w) norms, sandwich norms, an MLP with no bias slot. Baked vs hooked on small
random models, and a clear refusal for shifts that have nowhere to go."""

from __future__ import annotations

import random

import pytest
import torch

from bake import compiler
from bake.errors import BakeError
from bake.maps import Map
from bake.families import adapter_for
from bake.spec import Spec, write
from conftest import save_model, stamp
from test_differential import random_map


def make_gemma(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        model = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=8, **common))
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM
        model = Gemma2ForCausalLM(Gemma2Config(sliding_window=8, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))  # (1 + w) scales away from 1
    return model.eval()


def gemma_spec(model, seed: int) -> Spec:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cat = adapter_for(model).sites(model)
    sites = []
    for name, info in cat.items():
        if info.role == "residual" or rng.random() < 0.3:
            continue
        attn = "self_attn" in name or "input_layernorm" in name
        if attn:  # attention_bias gives q/k/v/o a bias slot
            kinds = ["affine", "additive", "projection"]
        elif info.role == "norm" and not info.consumers:
            kinds = ["scale"]  # post-attention / post-feedforward / final norm: scale only
        else:
            kinds = ["scale", "projection"]  # MLP: no bias slot, so no shift
        sites.append((name, [random_map(rng.choice(kinds), info.units, rng, gen) for _ in range(rng.randint(1, 2))]))
    return stamp(Spec(sites, method="random"), model)


@pytest.mark.parametrize("kind,seed", [("gemma3", 0), ("gemma3", 1), ("gemma2", 2)])
def test_gemma_baked_equals_hooked(tmp_path, tokenizer, kind, seed):
    model = make_gemma(kind, seed)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = gemma_spec(model, seed)
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"], v
    assert set(res.config_changes) <= {"attention_bias"}
    did: dict[str, list[str]] = {}
    for _, site, w in res.report:
        did.setdefault(site, []).append(w)
    writers = [s for s, _ in spec.sites if s.endswith(("post_attention_layernorm:output", "post_feedforward_layernorm:output"))]
    assert writers  # the random spec touches norms that write the residual stream
    for s in writers:  # nothing after them has a bias: the scale must go into their own (1 + w) weight
        assert any(f"{s.rsplit(':', 1)[0]}.weight" in w or "identity" in w for w in did[s]), (s, did[s])


@pytest.mark.parametrize("site,msg", [
    ("model.layers.0.post_attention_layernorm:output", "only a per-unit scale folds"),
    ("model.layers.1.post_feedforward_layernorm:output", "only a per-unit scale folds"),
    ("model.layers.0.pre_feedforward_layernorm:output", "cannot have"),
    ("model.layers.0.mlp.down_proj:output", "cannot have"),
    ("model.layers.0:output", "norm with no bias slot"),
])
def test_gemma_shifts_without_a_bias_slot_are_refused(tmp_path, tokenizer, site, msg):
    model = make_gemma("gemma3", 3)
    src = save_model(model, tokenizer, tmp_path / "model")
    d = adapter_for(model).sites(model)[site].units
    write(stamp(Spec([(site, [Map("additive", 1.0, {"v": torch.ones(d)})])]), model), tmp_path / "s.json")
    with pytest.raises(BakeError, match=msg) as e:
        compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", log=lambda *_: None)
    assert site in str(e.value)
    assert not (tmp_path / "out").exists()


def test_gemma_presets(tokenizer):
    model = make_gemma("gemma3", 4)
    ad = adapter_for(model)
    assert ad.family == "gemma"
    assert ad.resolve(model, ["post-norms"]) == [
        f"model.layers.{i}.{n}_layernorm:output" for i in range(2) for n in ("post_attention", "post_feedforward")]
