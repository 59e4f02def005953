"""`units` maps (extra gated-MLP units at an MLP's output) fold by growing every layer's MLP: random
units specs on small random models of each gated-MLP family, baked (a stock checkpoint with a wider
intermediate_size, no inserted modules) vs the hooked reference; streamed = in memory; llama.cpp runs
the grown GGUF; what cannot grow is refused with exit 2 and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bake import compiler
from bake.cli import main
from bake.maps import MAP_KINDS, Map
from bake.spec import Spec, write
from conftest import make_family, save_model, stamp
from test_differential import assert_baked_equals_hooked
from test_stream import save_sharded


def units_map(k: int, d: int, gen: torch.Generator, lam: float = 0.7) -> Map:
    """k random units reading and writing d features, strong enough to change the logits (as strong as
    the model's own units: gate and up rows of norm 2, down columns of rms 0.5)."""
    g, u = (2 * torch.randn(k, d, generator=gen) / d ** 0.5 for _ in range(2))
    return Map("units", lam, {"gate": g, "up": u, "down": 0.5 * torch.randn(d, k, generator=gen)})


def units_spec(model, seed: int, shifts: bool = True) -> Spec:
    """Units at both layers' MLP outputs (3 and 5 units), a linear map after them at layer 1 (it folds
    into down_proj and scales the new units' columns too), and maps elsewhere that fold as usual.
    shifts=False keeps every map shift-free (Qwen3's class has no bias on down_proj / o_proj)."""
    gen, d = torch.Generator().manual_seed(seed), model.config.hidden_size
    after = (Map("affine", 0.8, {"a": 1 + 0.3 * torch.randn(d, generator=gen), "b": 0.2 * torch.randn(d, generator=gen)})
             if shifts else Map("projection", 0.9, {"U": torch.linalg.qr(torch.randn(d, 2, generator=gen))[0]}))
    sites = [("model.layers.0.mlp.down_proj:output", [units_map(3, d, gen)]),
             ("model.layers.1.mlp.down_proj:output", [units_map(2, d, gen), units_map(3, d, gen, 1.2), after]),
             ("model.layers.0.post_attention_layernorm:output",
              [Map("affine", 1.0, {"a": 1 + 0.2 * torch.randn(d, generator=gen), "b": torch.zeros(d)})])]
    return stamp(Spec(sites, method="random"), model)


@pytest.mark.parametrize("family,seed,shifts", [("llama", 0, True), ("qwen2", 1, True), ("mistral", 2, True),
                                                ("qwen3", 3, False)])
def test_units_grow_a_stock_checkpoint_equal_to_the_hooked_reference(tmp_path, tokenizer, family, seed, shifts):
    model = make_family(family, seed)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = units_spec(model, seed, shifts)
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"], v
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 96 + 32  # 5 units at most per layer, padded to gcd(96, 256) = 32
    assert "auto_map" not in cfg and not list((tmp_path / "out").glob("*.py"))  # stock classes, no custom code
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert baked.model.layers[1].mlp.gate_proj.weight.shape == (128, 64)
    assert_baked_equals_hooked(model, baked, spec, seed)


def test_units_stream_equals_in_memory(tmp_path, tokenizer):
    """A sharded checkpoint streamed layer by layer grows the same MLPs, bit for bit, as the model baked in memory
    (the shards whose tensors grew are rewritten, not patched)."""
    model = make_family("llama", 4, layers=3)
    src = save_sharded(model, tokenizer, tmp_path / "model")
    write(units_spec(model, 4), tmp_path / "s.json")
    kw = dict(log=lambda *_: None, run_verify=False)
    compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "mem", dtype="float32", **kw)
    compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "st", stream=True, **kw)
    mem, st = (AutoModelForCausalLM.from_pretrained(str(tmp_path / d)).state_dict() for d in ("mem", "st"))
    assert mem.keys() == st.keys()
    for k in mem:
        assert torch.equal(mem[k], st[k]), k  # the same folds in the same order: bit for bit
    assert mem["model.layers.2.mlp.up_proj.weight"].shape[0] == 128
    assert not mem["model.layers.2.mlp.down_proj.weight"][:, 96:].any()  # a layer without units: zero columns


def _refused(tmp_path, capsys, model, sites, needle: str, *flags: str) -> None:
    src = tmp_path / "model"
    if not src.exists():
        from conftest import make_tokenizer
        save_model(model, make_tokenizer(), src)
    write(stamp(Spec(sites, method="random"), model), tmp_path / "bad.json")
    out = tmp_path / "out"
    assert main(["apply", "--model", str(src), "--spec", str(tmp_path / "bad.json"), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error") <= 1, err
    assert not out.exists()


def test_units_refusals_name_the_field_and_write_nothing(tmp_path, capsys):
    model = make_family("llama", 5)
    gen = torch.Generator().manual_seed(5)
    u = units_map(2, 64, gen)
    _refused(tmp_path, capsys, model, [("model.layers.0.self_attn.o_proj:output", [u])],
             "sites[0].site: a units map goes at the output of a gated MLP")
    bad = Map("units", 1.0, {**u.tensors, "down": torch.randn(64, 3)})
    _refused(tmp_path, capsys, model, [("model.layers.0.mlp.down_proj:output", [bad])], "tensors.down")
    narrow = Map("units", 1.0, {"gate": torch.randn(2, 32), "up": torch.randn(2, 32), "down": torch.randn(64, 2)})
    _refused(tmp_path, capsys, model, [("model.layers.0.mlp.down_proj:output", [narrow])], "reads 32 inputs")
    gated = MAP_KINDS["gated"].example(64, gen)
    _refused(tmp_path, capsys, model, [("model.layers.1.mlp.down_proj:output", [u, gated])],
             "a gated map shares this site with a units map")


def test_units_refuse_maps_the_new_units_would_miss(tmp_path, capsys):
    """Maps the grown MLP cannot give the new units as the reference does are refused, naming the site:
    a shift at the norm that feeds the MLP (it folds into gate / up's old rows), a map that would stay an
    inserted module of the old MLP width, and a shift after units where the family has no down_proj bias."""
    gen = torch.Generator().manual_seed(11)
    model = make_family("llama", 11)
    u = units_map(2, 64, gen)
    shift = Map("additive", 1.0, {"v": torch.randn(64, generator=gen)})
    _refused(tmp_path / "a", capsys, model, [("model.layers.0.post_attention_layernorm:output", [shift]),
                                             ("model.layers.0.mlp.down_proj:output", [u])],
             "model.layers.0.post_attention_layernorm:output: a shift or dense map at the norm that feeds the MLP")
    _refused(tmp_path / "b", capsys, model, [("model.layers.0.mlp.gate_proj:input", [shift]),
                                             ("model.layers.0.mlp.down_proj:output", [u])],
             "model.layers.0.mlp.gate_proj:input: a map at the MLP's input")
    gated = MAP_KINDS["gated"].example(96, gen)
    _refused(tmp_path / "c", capsys, model, [("model.layers.0.mlp.down_proj:output", [u]),
                                             ("model.layers.1.mlp.down_proj:input", [gated])],
             "model.layers.1.mlp.down_proj:input: this map does not fold", "--insert-modules")
    qwen3 = make_family("qwen3", 11)
    _refused(tmp_path / "d", capsys, qwen3, [("model.layers.1.mlp.down_proj:output", [u, shift])],
             "model.layers.1.mlp.down_proj:output: this map does not fold", "--insert-modules")


def test_units_refused_where_the_mlp_is_not_gated(tmp_path, capsys):
    model = make_family("gpt2", 6)
    u = units_map(2, 64, torch.Generator().manual_seed(6))
    _refused(tmp_path, capsys, model, [("transformer.h.0.mlp.c_proj:output", [u])],
             "sites[0].site: a units map goes at the output of a gated MLP")


@pytest.mark.slow
def test_grown_qwen2_gguf_runs_in_llama_cpp(tmp_path, capsys, monkeypatch):
    """The grown MLP written as GGUF (feed_forward_length the baked width) runs in llama.cpp as the
    hooked reference."""
    pytest.importorskip("llama_cpp", reason="install.sh installs llama-cpp-python (builds llama.cpp)")
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))  # the GGUF's conversion: gone with the test
    import gguf
    from gguf_tiny import tiny_qwen2_gguf

    from bake.models import load

    src = tiny_qwen2_gguf(tmp_path / "tiny-qwen2.gguf")
    model = load(str(src)).model
    write(units_spec(model, 7, shifts=False), tmp_path / "s.json")
    out = tmp_path / "out"
    code = main(["apply", "--max-new-tokens", "16", "--model", str(src), "--spec", str(tmp_path / "s.json"),
                 "--out", str(out), "--format", "gguf", "--gguf-type", "f32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    g = json.loads((out / "bake_report.json").read_text())["verification"]["gguf"]
    assert g["passed"] and g["max_rel"] <= 1e-4 and g["greedy_same"] == g["prompts"], g
    fields = gguf.GGUFReader(str(out / "model-F32.gguf")).fields
    assert fields["qwen2.feed_forward_length"].contents() == 256


def test_inverted_units_undo_the_units(tokenizer):
    """`bake invert`: a units map's inverse is the same units at −λ (z, the MLP's input, is untouched),
    so the spec composed with its inverse, hooked, is the original model."""
    from bake.algebra import compose, invert
    from bake.runtime import steered
    from test_differential import probe_ids

    model = make_family("llama", 8)
    spec = units_spec(model, 8)
    spec.sites = spec.sites[:2]
    ids, mask = probe_ids(400, 8)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with steered(model, compose([spec, invert(spec)])):
            back = model(input_ids=ids, attention_mask=mask).logits
        with steered(model, spec):
            steer = model(input_ids=ids, attention_mask=mask).logits
    assert (steer - plain).abs().max() > 1e-2
    assert torch.allclose(back, plain, rtol=0, atol=1e-4)


def test_hard_sigmoid_units_follow_the_gate():
    """The two silu units times u·z = 1 are the hard sigmoid clamp(s/4 + 1/2, 0, 1) softened: within
    0.05 of it away from its corners (the silu tails and u·z − 1), 0 and 1 far out; a ridge u gives u·z = 1 on rows with a constant
    component."""
    from bake.fit.dsas_units import gate_units, ones_direction, unit_gate

    g = torch.Generator().manual_seed(0)
    d = 16
    z = torch.randn(500, d, generator=g)
    z[:, 0] = 2.0  # a constant component: u reads it
    u = ones_direction(z)
    assert ((z.double() @ u) - 1).abs().max() < 1e-2
    w = torch.randn(d, generator=g)
    m = gate_units(w, 0.3, u, torch.ones(d), 1.0)
    s = z.double() @ w.double() + 0.3
    hard = (s / 4 + 0.5).clamp(0, 1)
    f = unit_gate(m, z)
    far = ((s / 4 + 0.5) - 0.5).abs() < 0.4  # away from the corners t = 0, 1
    assert (f - hard)[far].abs().max() < 0.05 and (f - hard).abs().max() < 0.1
    assert torch.corrcoef(torch.stack([f, torch.sigmoid(s)]))[0, 1] > 0.97


def test_dsas_units_gate_fits_folds_and_verifies(tmp_path, tokenizer, capsys):
    """bake fit --method dsas --gate-form units: the detector reads the MLP's input, the gate is two
    units at the MLP's output; the spec bakes into a stock checkpoint (wider MLP) and verifies."""
    from conftest import TEXTS
    from bake.spec import read

    model = make_family("llama", 9)
    src = save_model(model, tokenizer, tmp_path / "m")
    for name, texts in (("s", TEXTS[1::2]), ("t", TEXTS[0::2]), ("c", TEXTS[0::2][::-1])):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts))
    common = ["--model", str(src), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt")]
    assert main(["fit", *common, "--method", "caa", "--sites", "model.layers.1:output", "--out", str(tmp_path / "v.json")]) == 0
    assert main(["fit", *common, "--method", "dsas", "--control", str(tmp_path / "c.txt"), "--inner", str(tmp_path / "v.json"),
                 "--gate-form", "units", "--min-accuracy", "0.5", "--out", str(tmp_path / "g.json")]) == 0
    said = capsys.readouterr().out
    assert "units gate" in said and "model.layers.1.mlp.gate_proj:input" in said
    spec = read(str(tmp_path / "g.json"))
    (site, (m,)), = spec.sites
    assert site == "model.layers.1.mlp.down_proj:output" and m.kind == "units" and m.tensors["gate"].shape == (2, 64)
    assert main(["inspect", str(tmp_path / "g.json")]) == 0
    assert "units λ=1: 2 MLP unit(s) reading 64 inputs" in capsys.readouterr().out
    gate = spec.params["gates"][site]
    assert abs(gate["u_dot_z"]["mean"] - 1) < 0.05 and 0 <= gate["gate_agreement"] < 0.15  # measured 0.96, 0.073
    assert main(["apply", "--model", str(src), "--spec", str(tmp_path / "g.json"), "--out", str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 128 and "auto_map" not in cfg
    v = json.loads((tmp_path / "out" / "bake_report.json").read_text())["verification"]
    assert v["passed"] and v["max_rel"] <= 1e-5
    assert main(["fit", *common, "--method", "dsas", "--control", str(tmp_path / "c.txt"), "--inner", "mean-act",
                 "--gate-form", "units", "--out", str(tmp_path / "bad.json")]) == 2
    assert "--gate-form units" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_grown_mlp_exports_to_onnx_and_verifies(tmp_path, tokenizer):
    """The grown checkpoint exported to ONNX runs in ONNX Runtime as the hooked reference."""
    model = make_family("qwen2", 10)
    src = save_model(model, tokenizer, tmp_path / "model")
    write(units_spec(model, 10), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["safetensors", "onnx"],
                        max_new_tokens=8, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["onnx"]["passed"] and v["onnx"]["max_rel"] <= 1e-4, v
