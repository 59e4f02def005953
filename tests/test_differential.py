"""The compiler against the interpreter: random specs on small random Llama models, baked
(exported to disk, reloaded with stock from_pretrained) vs the hooked reference."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from bake import compiler
from bake.maps import Map
from bake.families import adapter_for
from bake.runtime import steered
from bake.spec import Spec, write
from conftest import make_llama, save_model, stamp

PRESETS = ["post-norms", "mlp-in", "attn-out", "mlp-out", "residual", "self_attn.q_proj:output",
           "mlp.up_proj:input", "model.norm:output"]


def random_map(kind: str, units: int, rng: random.Random, gen: torch.Generator) -> Map:
    lam = rng.uniform(0, 2)
    if kind == "affine":
        return Map("affine", lam, {"a": 1 + 0.3 * torch.randn(units, generator=gen),
                                   "b": 0.2 * torch.randn(units, generator=gen)})
    if kind == "scale":  # affine without shift (the final norm only takes scales)
        return Map("affine", lam, {"a": 1 + 0.3 * torch.randn(units, generator=gen), "b": torch.zeros(units)})
    if kind == "additive":
        return Map("additive", lam, {"v": 0.3 * torch.randn(units, generator=gen)})
    U, _ = torch.linalg.qr(torch.randn(units, rng.randint(1, 3), generator=gen))
    return Map("projection", lam, {"U": U})


def random_spec(model, patterns: list[str], seed: int) -> Spec:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ad = adapter_for(model)
    cat = ad.sites(model)
    sites = []
    for name in ad.resolve(model, patterns):
        info = cat[name]
        if info.role == "residual":
            kinds = ["additive"]
        elif info.role == "norm" and not info.consumers:
            kinds = ["scale"]
        else:
            kinds = ["affine", "additive", "projection"]
        maps = [random_map(rng.choice(kinds), info.units, rng, gen) for _ in range(rng.randint(1, 3))]
        sites.append((name, maps))
    return stamp(Spec(sites, method="random"), model)


def probe_ids(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on one row
    mask[2, :2] = 0
    return ids, mask


def assert_baked_equals_hooked(model, baked, spec, seed: int) -> None:
    """On a batched, left-padded forward over token ids the probe prompts never use: the stock-loaded
    baked model is within 1e-5 of the hooked reference, and the spec really steers."""
    ids, mask = probe_ids(model.config.vocab_size, seed)
    with torch.no_grad():
        with steered(model, spec):
            ref = model(input_ids=ids, attention_mask=mask).logits
        got = baked(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    err = (ref - got)[keep].abs().max() / ref[keep].abs().max()
    assert err <= 1e-5, err
    assert (ref - plain)[keep].abs().max() > 1e-3


CASES = [  # (seed, model kwargs, presets)
    (0, {}, PRESETS),
    (1, {"tie": False, "layers": 3}, ["post-norms", "attn-out", "residual"]),
    (2, {"attention_bias": True}, ["mlp-in", "self_attn.*:input", "self_attn.*:output"]),
    (3, {"mlp_bias": True, "hidden": 48, "inter": 80}, ["mlp.*:input", "mlp.*:output", "post-norms"]),
    (4, {}, ["**"]),
]


@pytest.mark.parametrize("seed,kw,patterns", CASES)
def test_baked_equals_hooked_fp32(tmp_path, tokenizer, seed, kw, patterns):
    model = make_llama(seed=seed, **kw)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = random_spec(model, patterns, seed)
    write(spec, tmp_path / "spec.json")
    res = compiler.apply(str(src), [str(tmp_path / "spec.json")], tmp_path / "out", max_new_tokens=12,
                        log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert_baked_equals_hooked(AutoModelForCausalLM.from_pretrained(str(src)), baked, spec, seed)
    # flags that the folds needed are on, so a stock loader keeps the biases
    for flag in res.config_changes:
        assert getattr(baked.config, flag) is True


def test_multiple_specs_compose_in_order(tmp_path, tokenizer):
    model = make_llama(seed=5)
    src = save_model(model, tokenizer, tmp_path / "model")
    a, b = random_spec(model, ["post-norms", "mlp-out"], 10), random_spec(model, ["post-norms", "residual"], 11)
    write(a, tmp_path / "a.json")
    write(b, tmp_path / "b.json")
    res = compiler.apply(str(src), [str(tmp_path / "a.json"), str(tmp_path / "b.json")], tmp_path / "out",
                        max_new_tokens=8, log=lambda *_: None)
    assert res.verification["passed"] and res.verification["max_rel"] <= 1e-5
    # order matters: (a then b) differs from (b then a) at shared sites, and the reference follows it
    ids, mask = probe_ids(model.config.vocab_size, 0)
    with torch.no_grad(), steered(model, [b, a]):
        swapped = model(input_ids=ids, attention_mask=mask).logits
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        got = baked(input_ids=ids, attention_mask=mask).logits
    assert (got - swapped)[mask.bool()].abs().max() > 1e-4


def test_identity_units_leave_weights_untouched(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = make_llama(seed=6)
    src = save_model(model, tokenizer, tmp_path / "model")
    d = model.config.hidden_size
    a, b = torch.ones(d), torch.zeros(d)
    a[3], b[5] = 1.5, 0.25  # two active units, the rest identity
    zero = Map("affine", 0.0, {"a": 1 + torch.rand(96), "b": torch.rand(96)})  # λ = 0: dropped
    spec = Spec([("model.layers.0.mlp.down_proj:output", [Map("affine", 1.0, {"a": a, "b": b})]),
                 ("model.layers.1.mlp.down_proj:input", [zero])], method="sparse")
    write(stamp(spec, model), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=4, log=lambda *_: None)
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    W0, W1 = before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"]
    rows = [i for i in range(d) if i != 3]
    assert torch.equal(W0[rows], W1[rows]) and not torch.equal(W0[3], W1[3])
    bias = after["model.layers.0.mlp.down_proj.bias"]
    assert bias[5] == 0.25 and int((bias != 0).sum()) == 1
    assert torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    assert any("identity" in w for _, s, w in res.report if s == "model.layers.1.mlp.down_proj:input")
    for k, t in before.items():  # everything else is byte-identical
        if "layers.0.mlp.down_proj" not in k:
            assert torch.equal(t, after[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_error_is_the_dtypes_own(tmp_path, tokenizer, dtype):
    model = make_llama(seed=7)
    src = save_model(model, tokenizer, tmp_path / "model")
    write(random_spec(model, ["post-norms", "mlp-out", "residual"], 7), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", dtype=dtype, max_new_tokens=8,
                        log=lambda *_: None)
    v = res.verification
    assert v["dtype"] == dtype
    assert v["hooked_noise_max_abs"] > 0
    assert v["max_abs"] <= 1.5 * v["hooked_noise_max_abs"], (v["max_abs"], v["hooked_noise_max_abs"])
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert baked.dtype == getattr(torch, dtype)


def test_fp32_beyond_tolerance_is_judged_against_float64(tmp_path, tokenizer, monkeypatch):
    """With the 1e-5 bar forced to 0, verify falls back to the float64 yardstick: the baked model must
    be as close to the exact answer as the hooked float32 model is. A wrong bake still fails."""
    from bake import verify as verify_mod

    monkeypatch.setattr(verify_mod, "REL_TOL", 0.0)
    model = make_llama(seed=8)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = random_spec(model, ["post-norms", "attn-out", "residual"], 8)
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=6, log=lambda *_: None)
    v = res.verification
    assert v["exact_ref"] == "hooked float64" and v["passed"]
    assert 0 < v["baked_vs_fp64_max_abs"] <= 1.5 * v["hooked_fp32_vs_fp64_max_abs"]
    other = random_spec(model, ["post-norms", "attn-out", "residual"], 9)
    bad = verify_mod.verify(lambda: (AutoModelForCausalLM.from_pretrained(str(src)), tokenizer), [other],
                            tmp_path / "out", max_new_tokens=6)
    assert not bad["passed"]


def test_site_globs_and_presets(tokenizer):
    from bake.families import adapter_for

    model = make_llama(seed=0, layers=3)
    ad = adapter_for(model)
    n = model.config.num_hidden_layers
    assert ad.resolve(model, ["residual"]) == [f"model.layers.{i}:output" for i in range(n)]
    assert len(ad.resolve(model, ["post-norms"])) == 2 * n
    assert ad.resolve(model, ["mlp.down_proj:input"]) == [f"model.layers.{i}.mlp.down_proj:input" for i in range(n)]
    assert ad.resolve(model, ["model.layers.1.self_attn.*:output"]) == [
        f"model.layers.1.self_attn.{x}_proj:output" for x in "qkvo"]
    assert ad.resolve(model, ["model.layers.?:output"]) == ad.resolve(model, ["residual"])
    assert len(ad.resolve(model, ["**"])) == len(ad.sites(model))
