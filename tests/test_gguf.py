"""Steered GGUF for llama.cpp, tested in llama.cpp itself (llama-cpp-python) on the embedded
SmolLM2-135M-Instruct (a Q4_1 GGUF): a projection spec (detox.json) and a spec that needs biases
(detox_mean_act.json) at f32 (relative logit error vs the hooked reference <= 1e-4, greedy identical),
at q8_0 and q4_k_m within the quantization yardstick (bake.verify_gguf), and what llama.cpp cannot run
refused before anything is written."""

from __future__ import annotations

import json

import pytest

from bake.cli import main

pytestmark = pytest.mark.slow
SHORT = ("--max-new-tokens", "16")  # verify's greedy length: half the default, the same checks
llama_cpp = pytest.importorskip("llama_cpp", reason="install.sh installs llama-cpp-python (builds llama.cpp)")


def _apply(tmp_path, spec: str, kind: str, capsys) -> dict:
    out = tmp_path / f"out_{kind}"
    code = main(["apply", *SHORT, "--model", "llama", "--spec", spec, "--out", str(out), "--format", "gguf",
                 "--gguf-type", kind])
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    assert (out / f"model-{kind.upper()}.gguf").is_file() and (out / "model.safetensors").is_file()
    return json.loads((out / "bake_report.json").read_text())["verification"]


@pytest.mark.parametrize("spec", ["examples/detox.json", "examples/detox_mean_act.json"])
def test_f32_gguf_equals_the_hooked_reference_in_llama_cpp(tmp_path, capsys, spec):
    v = _apply(tmp_path, spec, "f32", capsys)
    g = v["gguf"]
    assert v["passed"] and g["passed"], g
    assert g["max_rel"] <= 1e-4 and g["greedy_same"] == g["prompts"], g


@pytest.fixture(scope="module")
def q8_detox(tmp_path_factory):
    """detox.json applied at q8_0 (apply verifies it in llama.cpp): the output directory and its report."""
    out = tmp_path_factory.mktemp("q8") / "out"
    code = main(["apply", *SHORT, "--model", "llama", "--spec", "examples/detox.json", "--out", str(out), "--format", "gguf",
                 "--gguf-type", "q8_0"])
    assert code == 0
    return out, json.loads((out / "bake_report.json").read_text())["verification"]["gguf"]


def _within_yardstick(g: dict) -> None:
    assert g["passed"], g
    assert g["max_abs"] <= 1.5 * g["unsteered_max_abs"] and g["unsteered_max_abs"] > 0, g
    assert g["kl_quantized"] >= 0.5 * g["kl_float32"] > 0, g


def test_q8_0_gguf_within_the_yardstick_and_the_steering_survives(q8_detox):
    _within_yardstick(q8_detox[1])


def test_q4_k_m_gguf_with_biases_within_the_yardstick(tmp_path, capsys):
    _within_yardstick(_apply(tmp_path, "examples/detox_mean_act.json", "q4_k_m", capsys)["gguf"])


def test_verify_and_diff_take_a_gguf_file(q8_detox, tmp_path, capsys):
    """`bake verify --baked model-Q8_0.gguf` runs it in llama.cpp by the same yardstick as apply; `bake diff
    --steered model-Q8_0.gguf` compares it with the original (steered: KL > 0, the models run)."""
    out, g = q8_detox
    f = out / "model-Q8_0.gguf"
    assert main(["verify", *SHORT, "--model", "llama", "--spec", "examples/detox.json", "--baked", str(f),
                 "--report", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["format"] == "gguf" and v["gguf_type"] == "q8_0", v
    assert v["max_abs"] == pytest.approx(g["max_abs"], rel=1e-3), (v["max_abs"], g["max_abs"])
    (tmp_path / "p.txt").write_text("The weather today is\nMy neighbour is a\n")
    assert main(["diff", "--model", "llama", "--steered", str(f), "--prompts", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "8", "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["format"] == "gguf" and d["runtime"] == "llama.cpp" and d["summary"]["kl_mean"] > 0, d["summary"]


def test_gguf_refusals_write_nothing(tmp_path, capsys):
    from conftest import make_llama, make_tokenizer, save_model

    base = ["apply", "--spec", "examples/detox.json", "--format", "gguf"]
    assert main(base + ["--model", "llama", "--out", str(tmp_path / "a"), "--insert-modules"]) == 2
    assert "llama.cpp runs no generated code" in capsys.readouterr().err
    src = save_model(make_llama(), make_tokenizer(), tmp_path / "hf")  # a transformers directory, not a GGUF
    assert main(["apply", *SHORT, "--model", str(src), "--spec", "examples/detox.json", "--format", "gguf", "--out",
                 str(tmp_path / "b"), "--ignore-fingerprint"]) == 2
    err = capsys.readouterr().err
    assert "needs a GGUF model" in err or "--format gguf" in err, err
    assert main(base + ["--model", "llama", "--out", str(tmp_path / "c"), "--gguf-type", "q9_9"]) == 2
    assert "q9_9" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.fixture(scope="module")
def unsteered(tmp_path_factory):
    """The embedded model loaded in PyTorch, and its unsteered f32 GGUF in a directory with its config."""
    import shutil

    from bake.exporters import gguf_lm
    from bake.families import adapter_for
    from bake.models import load

    loaded = load("llama")
    base = tmp_path_factory.mktemp("unsteered")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(loaded.source / f, base / f)
    gguf_lm.write(loaded.source, loaded.source, base, "f32", adapter_for(loaded.model), log=lambda *_: None)
    return loaded, base


def _scaled_in_llama_cpp(unsteered, spec_path, scales, **adapter) -> list[float]:
    """Relative logit error at each scale s: llama.cpp with the adapter at s vs the hooked model at λ·s."""
    import torch

    from bake.llamacpp import LlamaCppLM
    from bake.runtime import steered
    from bake.spec import read
    from test_lora import scaled

    loaded, base = unsteered
    spec = read(spec_path)
    ids = loaded.tokenizer("You are such a", return_tensors="pt").input_ids
    rels = []
    for s in scales:
        key = "lora_scale" if "lora" in adapter else "control_scale"
        lm = LlamaCppLM(base, **adapter, **{key: s})
        got = lm(ids).logits[0].double()
        del lm
        with torch.no_grad(), steered(loaded.model, [scaled(spec, s)]):
            ref = loaded.model(ids).logits[0].double()
        rels.append(float((got - ref).abs().max() / ref.abs().max()))
    return rels


def test_llama_cpp_lora_scale_is_the_steering_strength(tmp_path, capsys, unsteered):
    """detox.json as a llama.cpp LoRA on the unsteered SmolLM2 (f32 GGUF): at scales 0.5 / 1 / 1.5 the
    logits equal the hooked reference at strength λ·s (f32 yardstick: relative error <= 1e-4)."""
    out = tmp_path / "out"
    assert main(["apply", *SHORT, "--model", "llama", "--spec", "examples/detox.json", "--out", str(out),
                 "--format", "lora"]) == 0, capsys.readouterr().err[-2000:]
    rels = _scaled_in_llama_cpp(unsteered, "examples/detox.json", (0.5, 1.0, 1.5),
                                lora=out / "lora" / "adapter-F32.gguf")
    assert max(rels) <= 1e-4, rels


def test_control_vector_in_llama_cpp_is_the_hooked_caa_at_each_scale(tmp_path, capsys, unsteered):
    """examples/detox_caa.json (CAA: additive maps at layer outputs 10-19) as a llama.cpp control vector:
    apply verifies it in llama.cpp at scale 1; at scales 0.5 and 2 it equals the hooked reference at λ·s;
    the vector holds λv per layer under llama.cpp's names."""
    from bake.exporters.control_vector import read as read_cvec
    from bake.spec import read

    out = tmp_path / "out"
    assert main(["apply", *SHORT, "--model", "llama", "--spec", "examples/detox_caa.json", "--out", str(out),
                 "--format", "control-vector"]) == 0, capsys.readouterr().err[-2000:]
    v = json.loads((out / "bake_report.json").read_text())["verification"]
    c = v["control-vector"]
    assert v["passed"] and c["passed"] and c["max_rel"] <= 1e-4 and c["greedy_same"] == c["prompts"], c
    dirs = read_cvec(out / "control-vector.gguf")
    spec = read("examples/detox_caa.json")
    assert sorted(dirs) == sorted(int(n.split(".")[2].split(":")[0]) for n, _ in spec.sites)
    n, maps = spec.sites[0]
    assert abs(dirs[int(n.split(".")[2].split(":")[0])] - maps[0].strength * maps[0].tensors["v"].numpy()).max() < 1e-6
    rels = _scaled_in_llama_cpp(unsteered, "examples/detox_caa.json", (0.5, 2.0),
                                control_vector=out / "control-vector.gguf")
    assert max(rels) <= 1e-4, rels


def test_eval_of_a_gguf_scores_padded_batches_and_samples_as_pytorch(unsteered, tmp_path):
    """The unsteered f32 GGUF in llama.cpp is the original model: `bake eval --baked` gives its FLORES
    perplexity in right-padded batches equal to PyTorch's, and sampled continuations (same seed,
    transformers' processors) equal PyTorch's own `generate`."""
    import torch

    from bake.llamacpp import LlamaCppLM

    loaded, base = unsteered
    assert main(["eval", "--model", "llama", "--baked", str(base / "model-F32.gguf"), "--task", "perplexity",
                 "--n-sentences", "6", "--batch-size", "3", "--out", str(tmp_path / "e.json")]) == 0
    points = {p["label"]: p for p in json.loads((tmp_path / "e.json").read_text())["points"]}
    assert points["baked"]["format"] == "gguf"
    ppl = [points[k]["perplexity"]["perplexity"] for k in ("original", "baked")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4), ppl
    lm, tok = LlamaCppLM(base), loaded.tokenizer
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(5)
    got = lm.generate(ids, **kw)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert got.tolist() == ref.tolist()


def test_control_vector_refusals_write_nothing(tmp_path, capsys):
    """A projection, and an additive map at layer 0 (llama.cpp keeps no vector there): exit 2, the site
    named, nothing written."""
    from bake.spec import read, write

    assert main(["apply", *SHORT, "--model", "llama", "--spec", "examples/detox.json", "--out", str(tmp_path / "a"),
                 "--format", "control-vector"]) == 2
    assert "one additive map per layer output" in capsys.readouterr().err
    spec = read("examples/detox_caa.json")
    (_, maps), = spec.sites[:1]
    spec.sites = [("model.layers.0:output", maps)]
    write(spec, tmp_path / "zero.json")
    assert main(["apply", *SHORT, "--model", "llama", "--spec", str(tmp_path / "zero.json"), "--out", str(tmp_path / "b"),
                 "--format", "control-vector"]) == 2
    assert "model.layers.0:output" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    import shutil

    from gguf_tiny import tiny_qwen2_gguf

    from bake.models import resolve

    path = tiny_qwen2_gguf(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf")
    yield path
    shutil.rmtree(resolve(str(path)), ignore_errors=True)  # its float32 conversion in bake's cache: leave nothing


@pytest.mark.parametrize("kinds,arch", [("projections", "qwen2"), ("random", "llama")])
def test_qwen2_gguf_in_llama_cpp(tiny_qwen2, tmp_path, capsys, kinds, arch):
    """A Qwen2 GGUF in, a steered GGUF out that llama.cpp runs as the hooked reference (f32 yardstick):
    projections keep Qwen2's class and are written as llama.cpp's `qwen2` (no rotary permutation, q/k/v
    biases); a random spec whose shifts need o_proj / MLP biases relabels the checkpoint as Llama and is
    written as `llama` (permuted, every bias llama.cpp's Llama loader reads)."""
    import gguf

    from bake.models import load
    from bake.spec import write
    from test_differential import random_spec
    from test_lora import projection_spec

    model = load(str(tiny_qwen2)).model
    spec = (projection_spec(model, ["attn-out", "mlp-in"]) if kinds == "projections"
            else random_spec(model, ["post-norms", "attn-out", "mlp-out"], seed=7))
    write(spec, tmp_path / "s.json")
    out = tmp_path / "out"
    code = main(["apply", *SHORT, "--model", str(tiny_qwen2), "--spec", str(tmp_path / "s.json"), "--out", str(out),
                 "--format", "gguf", "--gguf-type", "f32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    g = json.loads((out / "bake_report.json").read_text())["verification"]["gguf"]
    assert g["passed"] and g["max_rel"] <= 1e-4 and g["greedy_same"] == g["prompts"], g
    written = gguf.GGUFReader(str(out / "model-F32.gguf")).fields["general.architecture"].contents()
    assert written == arch
