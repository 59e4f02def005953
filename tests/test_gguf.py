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
llama_cpp = pytest.importorskip("llama_cpp", reason="install.sh installs llama-cpp-python (builds llama.cpp)")


def _apply(tmp_path, spec: str, kind: str, capsys) -> dict:
    out = tmp_path / f"out_{kind}"
    code = main(["apply", "--model", "llama", "--spec", spec, "--out", str(out), "--format", "gguf",
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


@pytest.mark.parametrize("spec,kind", [("examples/detox.json", "q8_0"), ("examples/detox_mean_act.json", "q4_k_m")])
def test_quantized_gguf_within_the_yardstick_and_the_steering_survives(tmp_path, capsys, spec, kind):
    g = _apply(tmp_path, spec, kind, capsys)["gguf"]
    assert g["passed"], g
    assert g["max_abs"] <= 1.5 * g["unsteered_max_abs"] and g["unsteered_max_abs"] > 0, g
    assert g["kl_quantized"] >= 0.5 * g["kl_float32"] > 0, g


def test_gguf_refusals_write_nothing(tmp_path, capsys):
    from conftest import make_llama, make_tokenizer, save_model

    base = ["apply", "--spec", "examples/detox.json", "--format", "gguf"]
    assert main(base + ["--model", "llama", "--out", str(tmp_path / "a"), "--insert-modules"]) == 2
    assert "llama.cpp runs no generated code" in capsys.readouterr().err
    src = save_model(make_llama(), make_tokenizer(), tmp_path / "hf")  # a transformers directory, not a GGUF
    assert main(["apply", "--model", str(src), "--spec", "examples/detox.json", "--format", "gguf", "--out",
                 str(tmp_path / "b"), "--ignore-fingerprint"]) == 2
    err = capsys.readouterr().err
    assert "needs a GGUF model" in err or "--format gguf" in err, err
    assert main(base + ["--model", "llama", "--out", str(tmp_path / "c"), "--gguf-type", "q9_9"]) == 2
    assert "q9_9" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_llama_cpp_lora_scale_is_the_steering_strength(tmp_path, capsys):
    """detox.json as a llama.cpp LoRA on the unsteered SmolLM2 (f32 GGUF): at scales 0.5 / 1 / 1.5 the
    logits equal the hooked reference at strength λ·s (f32 yardstick: relative error <= 1e-4)."""
    import shutil

    import torch

    from bake.exporters import gguf_lm
    from bake.families import adapter_for
    from bake.llamacpp import LlamaCppLM
    from bake.models import load
    from bake.runtime import steered
    from bake.spec import read
    from test_lora import scaled

    out = tmp_path / "out"
    assert main(["apply", "--model", "llama", "--spec", "examples/detox.json", "--out", str(out),
                 "--format", "lora"]) == 0, capsys.readouterr().err[-2000:]
    loaded = load("llama")
    model, src = loaded.model, loaded.source
    base = tmp_path / "base"
    base.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, base / f)
    gguf_lm.write(src, src, base, "f32", adapter_for(model), log=lambda *_: None)  # the original, unsteered
    spec = read("examples/detox.json")
    ids = loaded.tokenizer("You are such a", return_tensors="pt").input_ids
    for s in (0.5, 1.0, 1.5):
        lm = LlamaCppLM(base, lora=out / "lora" / "adapter-F32.gguf", lora_scale=s)
        got = lm(ids).logits[0].double()
        del lm
        with torch.no_grad(), steered(model, [scaled(spec, s)]):
            ref = model(ids).logits[0].double()
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, (s, rel)
