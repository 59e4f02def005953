"""ONNX export with KV cache, ONNX Runtime execution, and `bake diff` (the CI gate)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.errors import BakeError
from bake.exporters.onnx_lm import io_names
from bake.fit import FitConfig, fit
from bake.ort import OrtCausalLM, load_onnx
from bake.spec import write
from conftest import TEXTS, make_llama, save_model


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """A random Llama with existing-bias-free weights, a shift-carrying spec (the bias flags turn on),
    baked to safetensors and ONNX in one directory."""
    from conftest import make_tokenizer

    tmp = tmp_path_factory.mktemp("onnx")
    tok = make_tokenizer()
    model = make_llama(seed=11, layers=3)
    src = save_model(model, tok, tmp / "model")
    spec = fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("mean-act", ["post-norms"], strength=1.5))
    write(spec, tmp / "s.json")
    res = compiler.apply(str(src), [str(tmp / "s.json")], tmp / "out", formats=["safetensors", "onnx"],
                        log=lambda *_: None)
    return tmp, src, res


def test_apply_writes_and_verifies_both_formats(baked):
    tmp, _, res = baked
    v = res.verification
    assert v["passed"] and v["format"] == "safetensors"
    o = v["onnx"]  # prompts at once, then 32 decode steps through the KV cache, vs the hooked reference
    assert o["passed"] and o["max_rel"] <= 1e-5 and o["greedy_same"] == o["prompts"] == 8
    assert o["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    files = {p.name for p in (tmp / "out").iterdir()}
    assert {"model.onnx", "onnx_info.json", "model.safetensors", "config.json", "tokenizer.json"} <= files
    assert "ONNX verified" in (tmp / "out" / "README.md").read_text()
    rep = json.loads((tmp / "out" / "bake_report.json").read_text())
    assert rep["formats"] == ["safetensors", "onnx"]


def test_graph_has_optimum_names_and_dynamic_axes(baked):
    import onnx

    tmp, _, _ = baked
    g = onnx.load(str(tmp / "out" / "model.onnx"), load_external_data=False).graph
    ins, outs = io_names(3)
    assert [i.name for i in g.input] == ins and [o.name for o in g.output] == outs
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"] and ins[3] == "past_key_values.0.key"
    assert outs[:2] == ["logits", "present.0.key"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.2.value"][0] == "batch_size" and dims["past_key_values.2.value"][2] == "past_sequence_length"


def test_ort_matches_pytorch_on_padded_batches_and_decode_steps(baked):
    from transformers import AutoModelForCausalLM

    tmp, _, _ = baked
    pt = AutoModelForCausalLM.from_pretrained(str(tmp / "out")).eval()
    ort_model, tok = load_onnx(tmp / "out", "cpu")
    tok.padding_side = "left"
    enc = tok(TEXTS[:5], return_tensors="pt", padding=True)
    assert int((enc.attention_mask == 0).sum()) > 0  # really padded
    with torch.no_grad():
        ref = pt(**enc).logits
    got = ort_model(**enc).logits
    keep = enc.attention_mask.bool()
    assert ((ref - got)[keep].abs().max() / ref.abs().max()).item() < 1e-5
    # batched greedy generation through the KV cache, left padding included
    a = pt.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    b = ort_model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert torch.equal(a, b)
    # sampling follows transformers' processors and torch's sampler: same seed, same tokens
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.3, top_k=None, repetition_penalty=1.2,
              pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    a = pt.generate(**enc, **kw)
    torch.manual_seed(7)
    b = ort_model.generate(**enc, **kw)
    assert torch.equal(a, b)


def test_float16_onnx_is_judged_against_the_models_own_fp16_noise(baked, tmp_path):
    tmp, src, _ = baked
    res = compiler.apply(str(src), [str(tmp / "s.json")], tmp_path / "f16", formats=["onnx"], dtype="float16",
                        log=lambda *_: None)
    v = res.verification
    assert v["format"] == "onnx" and v["dtype"] == "float16" and v["passed"]
    assert 0 < v["max_abs"] <= 1.5 * v["hooked_noise_max_abs"]
    assert json.loads((tmp_path / "f16" / "onnx_info.json").read_text())["dtype"] == "float16"


def test_onnx_bad_input(baked, tmp_path, capsys):
    import onnx

    tmp, src, _ = baked
    base = ["apply", "--model", str(src), "--spec", str(tmp / "s.json")]
    for extra, msg in [(["--format", "gguf"], "--format"), (["--format", "onnx", "--dtype", "bfloat16"], "--dtype")]:
        assert main(base + ["--out", str(tmp_path / "x")] + extra) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # an ONNX file with a missing input: one clear line, exit 2
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("onnx_info.json", "config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((tmp / "out" / f).read_bytes())
    m = onnx.load(str(tmp / "out" / "model.onnx"))
    pos = next(i for i in m.graph.input if i.name == "position_ids")
    pos.name = "positions"
    for node in m.graph.node:
        node.input[:] = ["positions" if x == "position_ids" else x for x in node.input]
    onnx.save(m, str(bad / "model.onnx"))
    assert main(["diff", "--model", str(src), "--steered", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "position_ids" in err and err.count("\n") == 1


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.rows += tag == "tr"

    def handle_data(self, data):
        self.text.append(data)


def test_diff_gate_reports_and_exit_codes(baked, tmp_path, capsys):
    tmp, src, _ = baked
    (tmp_path / "p.txt").write_text("\n".join(TEXTS[:4]))
    common = ["diff", "--model", str(src), "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "8"]
    # the original against itself (a λ = 0 bake): nothing moves
    compiler.apply(str(src), [str(tmp / "s.json")], tmp_path / "same", strength=0.0, run_verify=False,
                  log=lambda *_: None)
    assert main(common + ["--steered", str(tmp_path / "same"), "--max-kl", "1e-9", "--min-top1", "1",
                          "--json", str(tmp_path / "same.json")]) == 0
    s = json.loads((tmp_path / "same.json").read_text())["summary"]
    assert s["kl_mean"] < 1e-9 and s["top1_agreement"] == 1 and s["greedy_same"] == 4
    # the steered model, both formats: the same numbers; a tight gate fails with exit 1
    docs = {}
    for fmt in ("safetensors", "onnx"):
        code = main(common + ["--steered", str(tmp / "out"), "--format", fmt, "--max-kl", "1e-6",
                              "--json", str(tmp_path / f"{fmt}.json"), "--report", str(tmp_path / f"{fmt}.html")])
        assert code == 1
        assert "--max-kl" in capsys.readouterr().err
        docs[fmt] = json.loads((tmp_path / f"{fmt}.json").read_text())
    a, b = docs["safetensors"]["summary"], docs["onnx"]["summary"]
    assert a["kl_mean"] > 1e-4 and abs(a["kl_mean"] - b["kl_mean"]) < 1e-4 * a["kl_mean"] + 1e-7
    assert a["top1_agreement"] == b["top1_agreement"] < 1
    assert docs["onnx"]["runtime"].endswith("ExecutionProvider") and not docs["onnx"]["passed"]
    # a generous gate passes
    assert main(common + ["--steered", str(tmp / "out"), "--max-kl", "100", "--min-top1", "0"]) == 0
    # the HTML report parses and holds one row per prompt plus the tables' headers and summary
    page = _Page()
    page.feed((tmp_path / "onnx.html").read_text(encoding="utf-8"))
    assert page.tags[0] == "html" and "table" in page.tags and page.rows >= 4 + 3
    assert "FAIL" in "".join(page.text) and TEXTS[0] in "".join(page.text)
    # bad input: exit 2, nothing written
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for extra, msg in [(["--steered", str(tmp_path)], "--steered"),
                       (["--steered", str(tmp / "out"), "--max-kl", "-1"], "--max-kl"),
                       (["--steered", str(tmp / "out"), "--max-kl", "nan"], "--max-kl"),
                       (["--steered", str(tmp / "out"), "--min-top1", "1.5"], "--min-top1"),
                       (["--steered", str(tmp / "out"), "--prompts", str(tmp_path / "empty.txt")], "--prompts"),
                       (["--steered", str(tmp / "out"), "--prompts", str(tmp_path / "latin1.txt")], "--prompts")]:
        args = ["diff", "--model", str(src)] + extra + ["--json", str(tmp_path / "bad.json")]
        if "--prompts" not in extra:
            args += ["--prompts", str(tmp_path / "p.txt")]
        assert main(args) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not (tmp_path / "bad.json").exists()


def test_eval_runs_an_onnx_directory(baked, tmp_path):
    from bake.evaluation import EvalConfig
    from bake.evaluation.sweep import run
    from bake.spec import read

    tmp, src, _ = baked
    cfg = EvalConfig(tasks=["toxicity", "perplexity"], prompts=TEXTS[:4], sentences=TEXTS[4:8], seeds=[0],
                     max_new_tokens=5, batch_size=4)
    onnx_only = tmp_path / "onnx_only"
    onnx_only.mkdir()
    for f in (tmp / "out").iterdir():
        if f.suffix != ".safetensors":
            (onnx_only / f.name).write_bytes(f.read_bytes())
    doc = run(str(src), cfg, tmp_path / "e.json", [read(tmp / "s.json")], [1.5], str(onnx_only), None,
              log=lambda *_: None)
    pts = {p["label"]: p for p in doc["points"]}
    assert pts["baked"]["format"] == "onnx"
    # the ONNX checkpoint gives the hooked spec's numbers: same sampled continuations, same perplexity
    assert pts["baked"]["toxicity"]["examples"] == pts["λ=1.5"]["toxicity"]["examples"]
    assert abs(pts["baked"]["perplexity"]["perplexity"] / pts["λ=1.5"]["perplexity"]["perplexity"] - 1) < 1e-5


def test_provider_choice_says_which(baked):
    import onnxruntime as ort

    tmp, _, _ = baked
    m = OrtCausalLM(tmp / "out", "auto")
    want = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert m.provider == want
    assert OrtCausalLM(tmp / "out", "cpu").provider == "CPUExecutionProvider"
    logits, present = m.step(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64), m.empty_past(1))
    assert logits.shape[:2] == (1, 3) and present[0].shape[2] == 3


def test_large_models_go_to_external_data(monkeypatch, tmp_path, tokenizer):
    """Over protobuf's 2 GB limit the weights go to model.onnx.data; shown with the limit lowered."""
    from bake.exporters import onnx_lm as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "PROTOBUF_LIMIT", 0)
    model = make_llama(seed=2)
    info = onnx_exporter.export(model, tokenizer, tmp_path / "ext", log=lambda *_: None)
    assert info["external_data"] and (tmp_path / "ext" / "model.onnx.data").is_file()
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000  # the graph alone
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = make_llama(seed=2)(ids).logits
    got = OrtCausalLM(tmp_path / "ext", "cpu")(input_ids=ids).logits
    assert ((ref - got).abs().max() / ref.abs().max()).item() < 1e-5


def test_onnx_of_gemma3_verifies(tmp_path, tokenizer):
    """Gemma-3's sliding layers (window 8) export with a full cache, and the (1 + w) norms fold: the ONNX
    graph equals the hooked reference in ONNX Runtime on prompts longer than the window."""
    from test_gemma import make_gemma
    from test_differential import random_spec

    model = make_gemma("gemma3", seed=0)
    src = save_model(model, tokenizer, tmp_path / "model")
    write(random_spec(model, ["post-norms", "attn-out"], 3), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["onnx"], max_new_tokens=8,
                         log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["greedy_same"] == v["prompts"]


@pytest.mark.parametrize("model_type,opset", [("cohere", 18), ("mixtral", 17), ("bloom", 17)])
def test_onnx_of_probed_families(tmp_path, tokenizer, model_type, opset):
    """Families bake reads by its probe export too: Cohere's interleaved rotary defeats the TorchScript
    tracer, so the dynamo exporter writes it (opset 18); Mixtral's experts trace as transformers'
    batched experts; BLOOM reads no position ids (ALiBi), so its graph has none. Prefill and every decode
    step through the KV cache equal PyTorch."""
    from bake.exporters import onnx_lm
    from bake.families.tiny import build

    model = build(model_type)
    info = onnx_lm.export(model, tokenizer, tmp_path / "o", log=lambda *_: None)
    assert info["opset"] == opset
    assert ("position_ids" in info["inputs"]) == (model_type != "bloom")
    seq = torch.randint(3, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=seq[None]).logits[0].double()
    got = OrtCausalLM(tmp_path / "o", "cpu").prefill_then_decode_logits(seq, 4)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_onnx_refuses_a_state_space_layer_before_work(tmp_path, tokenizer):
    """Jamba's Mamba layers keep a state, not keys and values: refused naming the layer, nothing written."""
    from bake.families.tiny import build

    from test_differential import random_spec

    model = build("jamba")
    src = save_model(model, tokenizer, tmp_path / "model")
    write(random_spec(model, ["residual"], 4), tmp_path / "s.json")
    with pytest.raises(BakeError, match="layer 0 keeps a LinearAttentionLayer"):
        compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["onnx"], log=lambda *_: None)
    assert not (tmp_path / "out").exists()


