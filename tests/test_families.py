"""Qwen2, Mistral, GPT-2 and Qwen3: random specs baked into small random models, reloaded with stock
from_pretrained, against the hooked reference; relabels to Llama where a fold needs a bias the
family's class lacks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bake import compiler
from bake.errors import BakeError
from bake.maps import Map
from bake.families import adapter_for
from bake.spec import Spec, write
from conftest import make_family, save_model, stamp
from test_differential import assert_baked_equals_hooked, random_spec

CASES = [  # (family, seed, presets, architecture expected after the bake)
    ("qwen2", 0, ["**"], "LlamaForCausalLM"),
    ("qwen2", 1, ["post-norms", "attn-out"], "LlamaForCausalLM"),
    ("mistral", 2, ["post-norms", "mlp-in", "residual"], "LlamaForCausalLM"),
    ("gpt2", 3, ["**"], "GPT2LMHeadModel"),
    ("gpt2", 4, ["post-norms", "mlp-in", "attn-out", "residual", "transformer.ln_f:output"], "GPT2LMHeadModel"),
]


def bake_random(tmp_path, tokenizer, family, seed, patterns):
    model = make_family(family, seed)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = random_spec(model, patterns, seed)
    write(spec, tmp_path / "spec.json")
    res = compiler.apply(str(src), [str(tmp_path / "spec.json")], tmp_path / "out", max_new_tokens=10,
                        log=lambda *_: None)
    return model, src, spec, res


@pytest.mark.parametrize("family,seed,patterns,arch", CASES)
def test_family_baked_equals_hooked(tmp_path, tokenizer, family, seed, patterns, arch):
    model, src, spec, res = bake_random(tmp_path, tokenizer, family, seed, patterns)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # stock loader, no custom code
    assert type(baked).__name__ == arch
    assert_baked_equals_hooked(model, baked, spec, seed)
    if arch != type(model).__name__:  # relabelled: the report says so
        assert any("relabelled" in w for _, _, w in res.report)
    else:
        assert not res.config_changes  # GPT-2 has every bias: stock architecture, stock config


def test_qwen2_relabel_keeps_qkv_biases(tmp_path, tokenizer):
    """A shift on o_proj's output needs a bias Qwen2 lacks: relabel to Llama with attention_bias on;
    the q/k/v biases come through byte-identical, o_proj's is the shift, the MLP stays bias-free."""
    model = make_family("qwen2", 9)
    src = save_model(model, tokenizer, tmp_path / "model")
    v = torch.randn(64)
    spec = Spec([("model.layers.1.self_attn.o_proj:output", [Map("additive", 0.5, {"v": v})])], method="caa")
    write(stamp(spec, model), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    assert res.verification["passed"] and res.config_changes["architectures"] == ["LlamaForCausalLM"]
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, t in before.items():
        assert torch.equal(t, after[k]), k  # every original tensor unchanged (the fold only adds a bias)
    assert torch.equal(after["model.layers.1.self_attn.o_proj.bias"], 0.5 * v)
    assert not after["model.layers.0.self_attn.o_proj.bias"].any()
    assert not any("mlp" in k and k.endswith("bias") for k in after)
    cfg = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).config
    assert cfg.attention_bias is True and cfg.mlp_bias is False and cfg.model_type == "llama"


def test_qwen2_stays_qwen2_when_no_new_bias_is_needed(tmp_path, tokenizer):
    """Scales anywhere and shifts into q/k/v (which Qwen2 has) need no relabel."""
    model = make_family("qwen2", 5)
    src = save_model(model, tokenizer, tmp_path / "model")
    g = torch.Generator().manual_seed(5)
    spec = Spec([("model.layers.0.input_layernorm:output",  # shift → q/k/v biases
                  [Map("affine", 1.0, {"a": 1 + 0.3 * torch.randn(64, generator=g), "b": 0.3 * torch.randn(64, generator=g)})]),
                 ("model.layers.1.mlp.down_proj:output",  # scale only
                  [Map("affine", 0.7, {"a": 1 + 0.3 * torch.randn(64, generator=g), "b": torch.zeros(64)})])],
                method="random")
    write(stamp(spec, model), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    assert res.verification["passed"] and not res.config_changes
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))).__name__ == "Qwen2ForCausalLM"


def test_mistral_sliding_window_is_reported(tmp_path, tokenizer):
    model = make_family("mistral", 6, sliding_window=64)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = Spec([("model.layers.1:output", [Map("additive", 1.0, {"v": torch.randn(64)})])], method="caa")
    write(stamp(spec, model), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    assert res.verification["passed"] and res.config_changes["mlp_bias"] is True
    note = [w for _, _, w in res.report if "relabelled" in w][0]
    assert "MistralForCausalLM → LlamaForCausalLM" in note and "up to 64 tokens" in note


def test_spec_for_another_family_is_refused(tmp_path, tokenizer):
    from bake.fit import FitConfig, fit

    qwen = make_family("qwen2", 7)
    spec = fit(qwen, tokenizer, ["you are an idiot"] * 4, ["the weather is lovely"] * 4, FitConfig("mean-act"))
    write(spec, tmp_path / "s.json")
    src = save_model(make_family("llama", 7), tokenizer, tmp_path / "llama")
    with pytest.raises(BakeError, match=r"spec.model.architecture: spec was fitted on 'Qwen2ForCausalLM'"):
        compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral"])
def test_fit_then_bake_on_each_family(tmp_path, tokenizer, family):
    from bake.fit import FitConfig, fit

    model = make_family(family, 8)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = fit(model, tokenizer, ["you are an idiot and i hate you", "stupid people ruin everything"] * 3,
               ["the weather is lovely today", "music fills the quiet room"] * 3, FitConfig("mean-act"))
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    assert res.verification["passed"] and res.verification["max_rel"] <= 1e-5


def test_families_table_is_computed_from_the_passes(capsys):
    from bake.cli import main
    from bake.support_table import table

    rows = {(r["family"], r["preset"]): r for r in table(["gpt2", "qwen2", "gemma"])}
    assert all(rows[("gpt2", p)][k] == "stock" for p in ("post-norms", "mlp-in", "attn-out", "mlp-out")
               for k in ("scale", "affine", "additive", "projection"))
    assert rows[("gpt2", "residual")]["additive"] == "stock" and rows[("gpt2", "residual")]["scale"] == "inserted module"
    assert rows[("qwen2", "attn-out")]["affine"] == "relabel → llama + attention_bias"
    assert rows[("qwen2", "mlp-out")]["scale"] == "stock"
    assert rows[("gemma", "post-norms")]["scale"] == "stock"
    assert rows[("gemma", "post-norms")]["additive"] == "inserted module"  # no bias slot in stock Gemma
    assert rows[("gemma", "attn-out")]["additive"] == "stock + attention_bias"
    assert main(["families", "--family", "nope"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("family,patterns", [("qwen2", ["post-norms", "attn-out"]), ("gpt2", ["**"])])
def test_onnx_export_of_other_families(tmp_path, tokenizer, family, patterns):
    """The ONNX exporter takes the relabelled Qwen2 (now Llama) and GPT-2 (Conv1D, learned positions)."""
    model = make_family(family, 10)
    src = save_model(model, tokenizer, tmp_path / "model")
    write(random_spec(model, patterns, 10), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["safetensors", "onnx"],
                        max_new_tokens=8, log=lambda *_: None)
    o = res.verification["onnx"]
    assert o["passed"] and o["max_rel"] <= 1e-5 and o["greedy_same"] == o["prompts"]


def test_onnx_of_a_sliding_window_verifies(tmp_path, tokenizer):
    """Mistral with a 6-token window: the graph keeps the full past and the sliding mask hides what lies
    outside the window, so ONNX Runtime's logits are the model's on prompts longer than the window (the
    graph keeps the mask: a 6-token window over 40-token sequences changes the logits)."""
    windowed, full = make_family("mistral", 11, sliding_window=6), make_family("mistral", 11, sliding_window=None)
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        assert (windowed(ids).logits - full(ids).logits).abs().max() > 1e-3  # the window matters at this length
    src = save_model(windowed, tokenizer, tmp_path / "model")
    u = torch.nn.functional.normalize(torch.randn(64, 1, generator=torch.Generator().manual_seed(3)), dim=0)
    write(Spec([("model.layers.0.mlp.down_proj:output", [Map("projection", 1.0, {"U": u})])], method="t"),
          tmp_path / "s.json")  # folds into down_proj: no relabel (the relabelled Llama has no window)
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["onnx"], max_new_tokens=8,
                         check_model=False, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]


QWEN3_SITES = ["model.layers.*.input_layernorm:output", "attn-out", "model.layers.*.self_attn.q_proj:output",
               "model.layers.*.self_attn.k_proj:input"]


def test_qwen3_added_as_one_table(tmp_path, tokenizer):
    """Qwen3 is one table in bake/families/decoders.py (Llama's graph; q/k norms read q_proj / k_proj
    outputs; attention_bias on its own class; a bias-free MLP): random specs at the sites that fold bake
    into the stock Qwen3 class and equal the hooked reference."""
    from bake.families import by_name

    model = make_family("qwen3", 12)
    assert adapter_for(model) is by_name("qwen3")
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = random_spec(model, QWEN3_SITES, 12)
    gen = torch.Generator().manual_seed(12)  # the MLP norm takes a scale only (gate and up have no bias slot)
    scale = Map("affine", 1.0, {"a": 1 + 0.2 * torch.randn(64, generator=gen), "b": torch.zeros(64)})
    spec.sites.append(("model.layers.1.post_attention_layernorm:output", [scale]))
    write(spec, tmp_path / "spec.json")
    res = compiler.apply(str(src), [str(tmp_path / "spec.json")], tmp_path / "out", max_new_tokens=10,
                         log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(baked).__name__ == "Qwen3ForCausalLM" and res.config_changes == {"attention_bias": True}
    assert_baked_equals_hooked(model, baked, spec, 12)


def test_qwen3_refuses_a_shift_into_its_bias_free_mlp(tmp_path, tokenizer):
    model = make_family("qwen3", 13)
    src = save_model(model, tokenizer, tmp_path / "model")
    write(stamp(Spec([("model.layers.0.mlp.down_proj:output", [Map("additive", 1.0, {"v": torch.ones(64)})])],
                     method="t"), model), tmp_path / "s.json")
    with pytest.raises(BakeError, match="cannot fold exactly: the shift needs a bias on model.layers.0.mlp.down_proj"):
        compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()
