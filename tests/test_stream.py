"""Streaming bake: a sharded checkpoint baked without loading the model, bit for bit the in-memory
bake; untouched shards copied or hard-linked; nothing half-written on a crash or a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bake import compiler
from bake.cli import main
from bake.errors import BakeError
from bake.exporters import shards
from bake.exporters.shards import INDEX, Checkpoint
from bake.spec import write
from conftest import make_family, make_llama, stamp
from test_differential import random_spec


def all_tensors(folder) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.tensor(n) for n in ck.entries}


def save_sharded(model, tok, path, dtype=torch.float32, shard="60KB"):
    model.to(dtype).save_pretrained(str(path), max_shard_size=shard)
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_equals_in_memory_bit_for_bit(tmp_path, tokenizer, dtype):
    model = make_llama(seed=20, layers=3)
    src = save_sharded(model, tokenizer, tmp_path / "model", dtype)
    assert len(json.loads((src / INDEX).read_text())["weight_map"]) > 0
    spec = random_spec(model, ["post-norms", "attn-out", "mlp-in", "residual"], 20)
    write(spec, tmp_path / "s.json")
    mem = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "mem", log=lambda *_: None,
                        dtype="float32" if dtype == torch.float32 else "bfloat16", run_verify=False)
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "st", stream=True, log=lambda *_: None,
                                 max_new_tokens=8, run_verify=dtype == torch.float32)
    if dtype == torch.float32:  # bf16: equal bit for bit to the in-memory bf16 export (below) is the claim
        v = res.verification
        assert v["passed"] and v["max_rel"] <= 1e-5
    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "st")
    a.pop("lm_head.weight", None)  # tied: the in-memory export may or may not store it
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k
    assert res.config_changes == mem.config_changes
    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "st"))  # stock loader
    assert baked.config.mlp_bias and baked.config.attention_bias


def test_stream_without_copy_file_range(tmp_path, tokenizer, monkeypatch):
    """Platforms without copy_file_range: shard copies and in-place patches go through a buffer."""
    monkeypatch.delattr(os, "copy_file_range")
    test_stream_equals_in_memory_bit_for_bit(tmp_path, tokenizer, torch.bfloat16)


def test_untouched_shards_are_copied_or_linked(tmp_path, tokenizer):
    from bake.maps import Map
    from bake.spec import Spec

    model = make_llama(seed=21, layers=4)
    src = save_sharded(model, tokenizer, tmp_path / "model")
    d = model.config.hidden_size
    spec = Spec([("model.layers.2.mlp.down_proj:output", [Map("affine", 1.0, {"a": 1 + torch.rand(d),
                                                                             "b": torch.zeros(d)})])], method="t")
    write(stamp(spec, model), tmp_path / "s.json")
    rc = main(["apply", "--model", str(src), "--spec", str(tmp_path / "s.json"), "--out", str(tmp_path / "out"),
               "--link", "--no-verify"])
    assert rc == 0
    index = json.loads((src / INDEX).read_text())["weight_map"]
    touched = index["model.layers.2.mlp.down_proj.weight"]
    for f in set(index.values()):
        same_inode = os.stat(src / f).st_ino == os.stat(tmp_path / "out" / f).st_ino
        assert same_inode == (f != touched), f
    after = load_file(str(tmp_path / "out" / touched))
    before = load_file(str(src / touched))
    for k in before:
        assert torch.equal(before[k], after[k]) == (k != "model.layers.2.mlp.down_proj.weight"), k
    assert json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"] == index  # no new tensors


@pytest.mark.parametrize("shift", [True, False])
def test_plan_reads_only_touched_tensors(tmp_path, tokenizer, monkeypatch, shift):
    """A shift at a norm needs its consumers' weights (W b); a scale needs the norm weight alone."""
    from bake.maps import Map
    from bake.spec import Spec

    model = make_llama(seed=22, layers=4)
    src = save_sharded(model, tokenizer, tmp_path / "model")
    d = model.config.hidden_size
    b = torch.rand(d) if shift else torch.zeros(d)
    spec = Spec([("model.layers.1.post_attention_layernorm:output",
                  [Map("affine", 1.0, {"a": 1 + torch.rand(d), "b": b})])], method="t")
    write(stamp(spec, model), tmp_path / "s.json")
    read = []
    orig = Checkpoint.tensor

    def spy(self, name):
        read.append(name)
        return orig(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", spy)
    compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", run_verify=False, stream=True, log=lambda *_: None)
    layer = "model.layers.1."
    allowed = {f"{layer}post_attention_layernorm.weight"}
    if shift:
        allowed |= {f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"}
    assert set(read) == allowed


def test_qwen2_relabel_streams(tmp_path, tokenizer):
    model = make_family("qwen2", 23)
    src = save_sharded(model, tokenizer, tmp_path / "model")
    write(random_spec(model, ["attn-out", "residual"], 23), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", stream=True, log=lambda *_: None,
                                 max_new_tokens=8)
    assert res.verification["passed"] and res.config_changes["architectures"] == ["LlamaForCausalLM"]
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))).__name__ == "LlamaForCausalLM"


def test_single_file_checkpoint_gains_biases_in_place(tmp_path, tokenizer):
    model = make_llama(seed=24)
    model.save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    write(random_spec(model, ["mlp-out"], 24), tmp_path / "s.json")
    res = compiler.apply(str(tmp_path / "model"), [str(tmp_path / "s.json")], tmp_path / "out",
                                 log=lambda *_: None, max_new_tokens=8, stream=True)
    assert res.verification["passed"]
    assert not (tmp_path / "out" / INDEX).exists()
    assert "model.layers.0.mlp.gate_proj.bias" in load_file(str(tmp_path / "out" / "model.safetensors"))


@pytest.mark.parametrize("where", ["write_shard", "place", "patch"])
def test_disk_full_is_one_clear_error(tmp_path, tokenizer, monkeypatch, where):
    """The extra shard, a shard copied on the copier thread, a changed tensor patched in: each one full."""
    model = make_llama(seed=25)
    src = save_sharded(model, tokenizer, tmp_path / "model")
    write(random_spec(model, ["post-norms"], 25), tmp_path / "s.json")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, where, full)
    with pytest.raises(BakeError, match="no space left on the device"):
        compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", stream=True, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_kill_9_leaves_out_absent(tmp_path, tokenizer):
    model = make_llama(seed=26, layers=6, hidden=256, inter=512)
    src = save_sharded(model, tokenizer, tmp_path / "model", shard="400KB")
    write(random_spec(model, ["post-norms", "mlp-out"], 26), tmp_path / "s.json")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bake", "apply", "--model", str(src), "--spec",
                             str(tmp_path / "s.json"), "--out", str(out), "--stream"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.bake-")]
        if staged and any(staged[0].rglob("*.safetensors")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the bake finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
