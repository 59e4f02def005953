"""Loading baked outputs safely (issue 38: items 18, 4, 10 and the LoRA part of 6).

- a checkpoint with inserted modules names bake's own model type: a stock `from_pretrained` without
  trust_remote_code=True fails and says so (transformers 5 here, 4.57 in the old-stack venv), instead of
  loading the unsteered stock model; with the flag it loads steered; the ONNX beside it is unaffected;
- a LoRA is read from safetensors only (an adapter_model.bin, a pickle, is refused, never loaded);
- a malformed adapter_config.json is one line naming the file and the field, exit 2;
- a streamed (or in-memory) bake carries none of the source's code: no `.py`, no `auto_map`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.families import adapter_for
from bake.maps import Map
from bake.runtime import steered
from bake.spec import Spec, read, write
from conftest import make_llama, save_model, stamp

IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60]])


def _gated_spec(model, seed: int = 0) -> Spec:
    """σ-gated maps at every post-norm: they never fold, so the checkpoint needs inserted modules."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    sites = [(n, [Map("gated", 0.9, {"w": torch.randn(d, generator=g) / d ** 0.5, "c": torch.tensor([0.2])},
                      inner=Map("additive", 1.0, {"v": 0.8 * torch.randn(d, generator=g)}))])
             for n in adapter_for(model).resolve(model, ["post-norms"])]
    return stamp(Spec(sites, method="test-gated"), model)


@pytest.fixture(scope="module")
def inserted(tmp_path_factory, tokenizer):
    """A tiny Llama baked with inserted modules to safetensors and ONNX (verified), with its reference."""
    tmp = tmp_path_factory.mktemp("inserted")
    model = make_llama(seed=11)
    src = save_model(model, tokenizer, tmp / "model")
    write(_gated_spec(model), tmp / "g.json")
    out = tmp / "out"
    res = compiler.apply(str(src), [str(tmp / "g.json")], out, formats=["safetensors", "onnx"], insert_modules=True,
                         log=lambda *_: None, max_new_tokens=4)
    with torch.no_grad():
        plain = model(IDS).logits[0, -1]
        with steered(model, read(tmp / "g.json")):
            ref = model(IDS).logits[0, -1]
    assert (plain - ref).abs().max() > 0.1  # the spec really moves the model
    return out, res.verification, ref, plain


def test_stock_load_of_inserted_modules_fails_and_says_trust_remote_code(inserted):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, v, ref, plain = inserted
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["onnx"]["passed"], v
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bake_llama" and cfg["architectures"] == ["BakeLlamaForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "modeling_bake.BakeConfig",
                               "AutoModelForCausalLM": "modeling_bake.BakeForCausalLM"}
    for flag in ({}, {"trust_remote_code": False}):  # no flag (no terminal to ask), or an explicit no
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(str(out), **flag)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoConfig.from_pretrained(str(out), **flag)
    m = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(m).__name__ == "BakeLlamaForCausalLM" and m.config.model_type == "bake_llama"
    with torch.no_grad():
        got = m(IDS).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, plain, atol=1e-2)


def test_the_onnx_beside_it_and_bakes_own_openers_are_unaffected(inserted):
    from bake.artifacts import open_artifact
    from bake.errors import BakeError

    out, _, ref, _ = inserted
    onnx = open_artifact(out, "onnx", flag="--baked")
    assert onnx.model.config.model_type == "llama"  # read as its stock type, without running any code
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(onnx.model(IDS).logits)[0, -1].float(), ref, atol=1e-4)
    with pytest.raises(BakeError, match="--trust-remote-code"):
        open_artifact(out, "safetensors", flag="--baked")
    art = open_artifact(out, "safetensors", trust_code=True, flag="--baked")
    with torch.no_grad():
        assert torch.allclose(art.model(IDS).logits[0, -1], ref, atol=1e-5)
    assert art.tokenizer("the cat").input_ids  # the tokenizer never needed the generated code


TRANSFORMERS4 = """
import json, sys, torch
from transformers import AutoModelForCausalLM
d, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
try:
    AutoModelForCausalLM.from_pretrained(d)
    refused = None
except Exception as e:
    refused = str(e)
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
with torch.no_grad():
    logits = m(ids).logits[0, -1].tolist()
print("\\nRESULT", json.dumps({"refused": refused, "cls": type(m).__name__, "logits": logits}))  # after the y/N prompt
"""


@pytest.mark.slow
def test_stock_load_fails_on_transformers_4(inserted):
    """The same checkpoint in transformers 4.57 (the old-stack venv of the runtime matrix, built once)."""
    from test_runtimes import _old_stack

    python = _old_stack()
    out, _, ref, _ = inserted
    r = subprocess.run([str(python), "-c", TRANSFORMERS4, str(out), json.dumps(IDS.tolist())], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert got["refused"] and "trust_remote_code=True" in got["refused"], got["refused"]
    assert got["cls"] == "BakeLlamaForCausalLM"
    assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-4)


# --- LoRA: safetensors only; a malformed adapter config is one line


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tokenizer):
    from test_lora import projection_spec

    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("lora")
    model = make_llama(seed=4)
    src = save_model(model, tokenizer, tmp / "model")
    write(projection_spec(model, ["attn-out"]), tmp / "p.json")
    out = tmp / "out"
    assert main(["apply", "--model", str(src), "--spec", str(tmp / "p.json"), "--out", str(out), "--format", "lora",
                 "--no-verify"]) == 0
    return tmp, src, out


def _verify_lora(tmp: Path, src: Path, out: Path) -> list[str]:
    return ["verify", "--model", str(src), "--spec", str(tmp / "p.json"), "--baked", str(out), "--max-new-tokens", "2"]


def _one_error(err: str) -> str:
    """The refusal: one `bake: error:` line, the last one written, and no traceback (progress bars aside)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum("bake: error:" in ln for ln in lines) == 1, err
    assert lines[-1].startswith("bake: error:") or "bake: error:" in lines[-1], err
    return lines[-1]


class _Marker:
    """Unpickling this touches a file: proof that something ran a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_lora_weights_are_read_from_safetensors_only(lora, tmp_path, capsys):
    from safetensors.torch import load_file

    tmp, src, base_out = lora
    out = tmp_path / "pickled"
    shutil.copytree(base_out, out)
    ad = out / "lora"
    marker = tmp_path / "unpickled"
    weights = load_file(str(ad / "adapter_model.safetensors"))
    (ad / "adapter_model.safetensors").unlink()
    with open(ad / "adapter_model.bin", "wb") as f:  # the same tensors, and a payload torch.load would run
        pickle.dump({**weights, "x": _Marker(str(marker))}, f)
    code = main(_verify_lora(tmp, src, out))
    err = _one_error(capsys.readouterr().err)
    assert code == 2 and "adapter_model.safetensors' is missing" in err and "pickle" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "no-base", "not-an-object", "truncated-weights"])
def test_a_malformed_lora_is_one_line_naming_the_file_and_field(lora, tmp_path, capsys, case):
    tmp, src, base_out = lora
    out = tmp_path / case
    shutil.copytree(base_out, out)
    conf = out / "lora" / "adapter_config.json"
    text = conf.read_text()
    if case == "truncated":
        conf.write_text(text[: len(text) // 2])
    elif case == "no-base":
        doc = json.loads(text)
        del doc["base_model_name_or_path"]
        conf.write_text(json.dumps(doc))
    elif case == "not-an-object":
        conf.write_text("[1, 2]")
    else:
        w = out / "lora" / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    code = main(_verify_lora(tmp, src, out))
    err = _one_error(capsys.readouterr().err)
    named = "adapter_model.safetensors" if case == "truncated-weights" else "adapter_config.json"
    assert code == 2 and named in err, err
    if case == "no-base":
        assert "base_model_name_or_path" in err, err


def test_the_lora_still_verifies(lora, capsys):
    tmp, src, out = lora
    assert main(_verify_lora(tmp, src, out)) == 0, capsys.readouterr().err


# --- the source's code never reaches the output


EVIL = "import pathlib; pathlib.Path(__file__).with_name('RAN').touch()\n"


@pytest.mark.parametrize("stream", [True, False])
def test_a_bake_carries_none_of_the_sources_code(tmp_path, tokenizer, stream):
    from transformers import AutoModelForCausalLM

    from test_differential import random_spec

    model = make_llama(seed=5)
    src = tmp_path / "model"
    model.save_pretrained(str(src), max_shard_size="60KB")
    tokenizer.save_pretrained(str(src))
    for name in ("modeling_evil.py", "tokenization_evil.py"):
        (src / name).write_text(EVIL)
    maps = {"config.json": {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "someone/repo--conf.C"},
            "tokenizer_config.json": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    for name, am in maps.items():
        doc = json.loads((src / name).read_text())
        (src / name).write_text(json.dumps({**doc, "auto_map": am}))
    write(random_spec(model, ["post-norms"], 1), tmp_path / "s.json")
    out = tmp_path / "out"
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], out, stream=stream, run_verify=False,
                         log=lambda *_: None)
    assert res.streamed is stream
    assert not list(out.glob("*.py"))
    for name in maps:
        assert "auto_map" not in json.loads((out / name).read_text()), name
    assert any(p == "portable" and "auto_map removed" in what for p, _, what in res.report)
    m = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)  # the stock class: no code ran
    assert type(m).__name__ == "LlamaForCausalLM" and not (out / "RAN").exists() and not (src / "RAN").exists()
