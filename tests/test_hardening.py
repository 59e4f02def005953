"""Never wrong, never destructive: the adversarial cases of issue 19, each ending in exit 2 with one line
and nothing written, or in exit 0 with a verified, finite model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bake import spec as spec_mod
from bake.cli import main
from bake.exporters import staging
from bake.maps import Map
from bake.spec import Spec, write
from conftest import make_llama, save_model

ROOT = Path(__file__).resolve().parents[1]
SITE = "model.layers.0.mlp.down_proj:output"
D = 64


def run(args, capsys):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err: str) -> str:
    """The error as printed: exactly one `bake: error:` line and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bake:")]
    assert len(lines) == 1 and lines[0].startswith("bake: error: "), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture()
def fitted(tmp_path, tiny_dir):
    """A real fitted additive spec (with its model block) on the tiny model, and a place to write."""
    from bake.models import fingerprint, load

    loaded = load(str(tiny_dir))
    from bake.families import adapter_for

    info = adapter_for(loaded.model).sites(loaded.model)[SITE]
    spec = Spec([(SITE, [Map("additive", 0.5, {"v": torch.randn(D)})])], method="caa",
                model=fingerprint(loaded.model, [info]))
    write(spec, tmp_path / "spec.json")
    return tmp_path


def mutate(folder: Path, name: str, doc_fn=None, tensors_fn=None, raw: str | None = None) -> Path:
    """A copy of spec.json with its manifest (dict or raw text) and/or tensors changed."""
    doc = json.loads((folder / "spec.json").read_text())
    tensors = load_file(str(folder / "spec.safetensors"))
    if tensors_fn:
        tensors = tensors_fn(tensors)
    doc["tensors"] = f"{name}.safetensors"
    save_file(tensors, str(folder / f"{name}.safetensors"))
    if doc_fn:
        doc = doc_fn(doc) or doc
    text = raw(doc) if callable(raw) else json.dumps(doc)
    (folder / f"{name}.json").write_text(text)
    return folder / f"{name}.json"


def _strength(value: str):
    def fn(doc):
        return json.dumps(doc).replace('"strength": 0.5', f'"strength": {value}')
    return fn


def _nest(depth: int):
    def fn(doc):
        return json.dumps(doc).replace('"params": {}', '"params": ' + "[" * depth + "]" * depth)
    return fn


MUTATIONS = {  # name → (mutate kwargs, a word the one error line must hold)
    "strength-400-digits": (dict(raw=_strength("1" * 400)), "400 digits"),
    "strength-5000-digits": (dict(raw=_strength("1" * 5000)), "not valid JSON"),
    "strength-bool": (dict(raw=_strength("true")), "strength"),
    "strength-nan-literal": (dict(raw=_strength("NaN")), "strength"),
    "version-true": (dict(doc_fn=lambda d: d.update(version=True)), "spec.version"),
    "duplicate-key": (dict(raw=lambda d: json.dumps(d)[:-1] + ', "method": "again"}'), "appears twice"),
    "params-100000-deep": (dict(raw=_nest(100_000)), "too deeply"),
    "shapes-list": (dict(doc_fn=lambda d: d["model"].update(shapes=[1, 2])), "spec.model.shapes"),
    "shape-not-int": (dict(doc_fn=lambda d: d["model"]["shapes"].update(hidden_size="64")), "hidden_size"),
    "model-field-unknown": (dict(doc_fn=lambda d: d["model"].update(colour="red")), "colour"),
    "tensors-missing-file": (dict(doc_fn=lambda d: d.update(tensors="absent.safetensors")), "not found"),
    "v-0d": (dict(tensors_fn=lambda t: {k: v[0] for k, v in t.items()}), "0-d"),
    "v-f8": (dict(tensors_fn=lambda t: {k: v.to(torch.float8_e4m3fn) for k, v in t.items()}), "float8"),
    "v-nan": (dict(tensors_fn=lambda t: {k: v * float("nan") for k, v in t.items()}), "NaN"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_spec_exit_2_one_line_nothing_written(name, fitted, tiny_dir, capsys):
    kwargs, word = MUTATIONS[name]
    path = mutate(fitted, name, **kwargs)
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", path, "--out", fitted / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and word in line, line
    assert not (fitted / "o").exists() and leftovers(fitted) == []


def test_zero_d_tensors_of_every_kind(tmp_path):
    for kind, tensors in [("projection", {"U": torch.tensor(1.0)}), ("affine", {"a": torch.tensor(1.0),
                                                                                "b": torch.tensor(0.0)})]:
        path = tmp_path / f"{kind}.json"
        save_file({f"t.{k}": v for k, v in tensors.items()}, str(tmp_path / f"{kind}.safetensors"))
        path.write_text(json.dumps({"format": "bake-spec", "version": 1, "tensors": f"{kind}.safetensors",
                                    "sites": [{"site": SITE, "maps": [{"kind": kind, "tensors": {
                                        k: f"t.{k}" for k in tensors}}]}]}))
        with pytest.raises(spec_mod.BakeError, match="0-d"):
            spec_mod.read(path)


def test_tensor_file_link_outside_refused(fitted, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "t.safetensors"
    save_file(load_file(str(fitted / "spec.safetensors")), str(elsewhere))
    os.symlink(elsewhere, fitted / "linked.safetensors")
    doc = json.loads((fitted / "spec.json").read_text())
    doc["tensors"] = "linked.safetensors"
    (fitted / "linked.json").write_text(json.dumps(doc))
    with pytest.raises(spec_mod.BakeError, match="outside the spec's directory"):
        spec_mod.read(fitted / "linked.json")


def test_card_hashes_the_tensor_file_the_spec_names(fitted, tiny_dir, capsys):
    """A manifest may name any tensor file beside it: the card records that file's hash, not <stem>'s."""
    path = mutate(fitted, "named")
    os.rename(fitted / "named.safetensors", fitted / "other.safetensors")
    doc = json.loads(path.read_text())
    doc["tensors"] = "other.safetensors"
    path.write_text(json.dumps(doc))
    code, out, err = run(["apply", "--model", tiny_dir, "--spec", path, "--out", fitted / "o"], capsys)
    assert code == 0, err
    want = hashlib.sha256(path.read_bytes() + (fitted / "other.safetensors").read_bytes()).hexdigest()
    report = json.loads((fitted / "o" / "bake_report.json").read_text())
    assert report["specs"][0]["sha256"] == want


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "1" * 400])
def test_strength_flag_validated(value, fitted, tiny_dir, capsys):
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", fitted / "spec.json", f"--strength={value}",
                        "--out", fitted / "o"], capsys)
    assert code == 2 and "--strength" in one_error_line(err)
    assert not (fitted / "o").exists() and leftovers(fitted) == []


def refused_or_verified(code: int, out: str, err: str, outdir: Path) -> str:
    """Either exit 2 with one line and nothing written, or exit 0 with a verified model whose every
    tensor is finite: never a written NaN model, never a traceback."""
    if code == 2:
        assert not outdir.exists() and leftovers(outdir.parent) == []
        return one_error_line(err)
    assert code == 0 and "verify: PASS" in out and "Traceback" not in err, (code, err)
    weights = load_file(str(outdir / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    return "verified"


@pytest.mark.parametrize("case", ["strength-1e308", "strength-1e30", "v-3e38", "projection-1e30"])
def test_overflowing_spec_never_verified(case, fitted, tiny_dir, capsys):
    """Finite inputs whose folds or outputs may overflow float32: refused, or verified and finite."""
    if case == "v-3e38":
        path = mutate(fitted, case, tensors_fn=lambda t: {k: torch.full_like(v, 3e38) for k, v in t.items()})
    elif case == "projection-1e30":
        doc = json.loads((fitted / "spec.json").read_text())
        u = torch.zeros(D, 1)
        u[3] = 1.0
        save_file({"u": u}, str(fitted / "p.safetensors"))
        doc.update(tensors="p.safetensors", sites=[{"site": f"model.layers.{i}.{m}:output", "maps": [
            {"kind": "projection", "strength": 1e30, "tensors": {"U": "u"}}]}
            for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")])
        path = fitted / "p.json"
        path.write_text(json.dumps(doc))
    else:
        path = mutate(fitted, case, raw=_strength(case.split("-")[1]))
    code, out, err = run(["apply", "--model", tiny_dir, "--spec", path, "--out", fitted / "o"], capsys)
    what = refused_or_verified(code, out, err, fitted / "o")
    if case == "strength-1e308":  # 1e308 · v overflows float32 in the fold itself
        assert code == 2 and "not finite" in what, what


def test_verify_fails_on_nan_logits(fitted, tiny_dir, tokenizer, capsys):
    """A baked directory whose weights are NaN: verify FAILS (exit 1), naming the NaN logits."""
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    bad = save_model(model, tokenizer, fitted / "nan-model")
    code, out, err = run(["verify", "--model", tiny_dir, "--spec", fitted / "spec.json", "--baked", bad,
                          "--max-new-tokens", "4"], capsys)
    assert code == 1 and "FAIL" in out and "NaN or Inf" in out


def test_diff_gate_fails_a_nan_model(fitted, tiny_dir, tokenizer, capsys):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    bad = save_model(model, tokenizer, fitted / "nan-model")
    (fitted / "p.txt").write_text("hello there\nthe cat sat\n")
    for extra in (["--max-kl", "1"], []):  # with a threshold or without: NaN fails on its own
        code, _, err = run(["diff", "--model", tiny_dir, "--steered", bad, "--prompts", fitted / "p.txt",
                            "--max-new-tokens", "3", *extra], capsys)
        assert code == 1 and "non-finite" in err


def test_force_never_deletes_inputs(fitted, tiny_dir, tokenizer, capsys, tmp_path_factory):
    root = tmp_path_factory.mktemp("force")
    model_dir = save_model(make_llama(), tokenizer, root / "models" / "m")
    (root / "models" / "sibling.txt").write_text("keep")
    from bake.families import adapter_for
    from bake.models import fingerprint, load

    loaded = load(str(model_dir))
    info = adapter_for(loaded.model).sites(loaded.model)[SITE]
    write(Spec([(SITE, [Map("additive", 0.5, {"v": torch.randn(D)})])], model=fingerprint(loaded.model, [info])),
          root / "specs" / "s.json")
    (root / "specs" / "p.txt").write_text("a prompt\n")
    os.symlink(root / "models", root / "link")
    before = sorted(str(p) for p in root.rglob("*"))
    for out, what in [(root / "models", "model directory"), (root / "link", "model directory"),
                      (root / "specs", "spec file"), (model_dir, "model directory"), (root, "spec file")]:
        code, _, err = run(["apply", "--model", model_dir, "--spec", root / "specs" / "s.json", "--out", out,
                            "--force", "--no-verify"], capsys)
        line = one_error_line(err)
        assert code == 2 and what in line, line
    code, _, err = run(["apply", "--model", model_dir, "--spec", root / "specs" / "s.json", "--prompts",
                        root / "o" / "p.txt", "--out", root / "o", "--force"], capsys)
    assert code == 2  # no such prompts file; and the prompts may not sit inside --out either:
    (root / "o").mkdir()
    (root / "o" / "p.txt").write_text("a prompt\n")
    code, _, err = run(["apply", "--model", model_dir, "--spec", root / "specs" / "s.json", "--prompts",
                        root / "o" / "p.txt", "--out", root / "o", "--force"], capsys)
    assert code == 2 and "input file" in one_error_line(err)
    assert sorted(str(p) for p in root.rglob("*")) == sorted(before + [str(root / "o"), str(root / "o" / "p.txt")])


@pytest.mark.parametrize("out", ["", "FILE/out"])
def test_bad_out_paths(out, fitted, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(fitted)
    (fitted / "FILE").write_text("a file")
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", fitted / "spec.json", "--out", out, "--force"],
                       capsys)
    assert code == 2 and "--out" in one_error_line(err)
    assert (fitted / "spec.json").is_file() and (fitted / "FILE").read_text() == "a file"


def test_full_disk_is_one_line(fitted, tiny_dir, capsys, monkeypatch):
    import errno

    from bake.exporters import checkpoint as st

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(st, "check_finite", full)  # the first thing the exporter does in the staging dir
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", fitted / "spec.json", "--out", fitted / "o"], capsys)
    assert code == 2 and "no space left" in one_error_line(err)
    assert not (fitted / "o").exists() and leftovers(fitted) == []


def test_force_replace_leaves_nothing_behind_and_recovers(fitted, tiny_dir, capsys):
    out = fitted / "o"
    for _ in range(2):
        code, _, err = run(["apply", "--model", tiny_dir, "--spec", fitted / "spec.json", "--out", out, "--force",
                            "--no-verify"], capsys)
        assert code == 0, err
    assert (out / "model.safetensors").is_file() and leftovers(fitted) == []
    # a run killed between the two renames of the fallback replace: the old output is hidden, not lost
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.replace(out, fitted / f".o.old-{dead.pid}")
    staging.clear_stale(out, log=print)
    assert (out / "model.safetensors").is_file() and leftovers(fitted) == []
    assert "restored" in capsys.readouterr().out
    # without the atomic exchange (another OS or filesystem) the replace still leaves nothing behind
    tmp = fitted / ".o.bake-new"
    tmp.mkdir()
    (tmp / "x").write_text("new")
    saved = staging._exchange
    staging._exchange = lambda a, b: False
    try:
        staging._replace(tmp, out)
    finally:
        staging._exchange = saved
    assert sorted(p.name for p in out.iterdir()) == ["x"] and leftovers(fitted) == []


def test_no_model_block_needs_ignore_fingerprint(fitted, tiny_dir, capsys):
    path = mutate(fitted, "bare", doc_fn=lambda d: d.update(model={}))
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", path, "--out", fitted / "o"], capsys)
    assert code == 2 and "no model block" in one_error_line(err)
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", path, "--out", fitted / "o", "--ignore-fingerprint",
                        "--no-verify"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("how", ["lora-merge", "default-norms"])
def test_fingerprint_sees_more_than_norms(how, tmp_path, tokenizer, capsys):
    """Two models whose anchors (norm weights) are equal but whose other weights differ."""
    from bake.families import adapter_for
    from bake.models import fingerprint

    site = "model.layers.1.post_attention_layernorm:output"  # anchored on the norm weight
    a = make_llama(seed=1)
    if how == "lora-merge":
        b = make_llama(seed=1)
        with torch.no_grad():  # W + BA on one projection, norms untouched
            q = b.model.layers[0].self_attn.q_proj.weight
            q += 0.01 * torch.randn(q.shape[0], 4) @ torch.randn(4, q.shape[1])
    else:
        from transformers import LlamaForCausalLM

        a, b = LlamaForCausalLM(a.config).eval(), LlamaForCausalLM(a.config).eval()  # norms all ones
    info = adapter_for(a).sites(a)[site]
    assert fingerprint(a, [info])["weights_sha256"] == fingerprint(b, [info])["weights_sha256"]  # the old weakness
    save_model(a, tokenizer, tmp_path / "a")
    save_model(b, tokenizer, tmp_path / "b")
    write(Spec([(site, [Map("additive", 1.0, {"v": torch.randn(D)})])], model=fingerprint(a, [info])),
          tmp_path / "s.json")
    for extra in ([], ["--stream"]):
        code, _, err = run(["apply", "--model", tmp_path / "b", "--spec", tmp_path / "s.json", "--out",
                            tmp_path / "o", *extra], capsys)
        assert code == 2 and "weights_digest" in one_error_line(err)
    code, _, err = run(["apply", "--model", tmp_path / "a", "--spec", tmp_path / "s.json", "--out", tmp_path / "o",
                        "--stream"], capsys)
    assert code == 0, err


def test_pickled_model_refused(tmp_path, tokenizer, capsys):
    model = make_llama()
    model.config.save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # the test writes it; bake must not read it
    code, _, err = run(["fit", "--model", tmp_path / "m", "--source", tmp_path / "m" / "config.json", "--target",
                        tmp_path / "m" / "config.json", "--method", "caa", "--out", tmp_path / "s.json"], capsys)
    line = one_error_line(err)
    assert code == 2 and "pickled weights" in line and "save_pretrained" in line


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTok(PreTrainedTokenizerFast):
    pass
"""


def _evil(folder: Path, marker: Path, config: bool = True, tokenizer: bool = False) -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForCausalLM": "evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc.update(auto_map={"AutoTokenizer": [None, "evil.EvilTok"]}, tokenizer_class="EvilTok")
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))


def _bake_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    """The real command line with 'y' piped in: a prompt for remote code, if any, would be answered yes."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], input="y\ny\ny\n", text=True,
                          capture_output=True, cwd=cwd, timeout=300)


def test_remote_code_never_runs_without_the_flag(fitted, tiny_dir, tokenizer, tmp_path_factory):
    import shutil

    marker = tmp_path_factory.mktemp("marker") / "ran.txt"
    # 1. verify --baked whose tokenizer asks for remote code
    baked = fitted / "baked"
    assert main(["apply", "--model", str(tiny_dir), "--spec", str(fitted / "spec.json"), "--out", str(baked),
                 "--no-verify"]) == 0
    _evil(baked, marker, config=False, tokenizer=True)
    r = _bake_cli(["verify", "--model", tiny_dir, "--spec", fitted / "spec.json", "--baked", baked,
                   "--max-new-tokens", "3"], fitted)
    assert not marker.exists(), r.stderr
    assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr
    # 2. apply --stream of a model type that only its own code defines
    evil_model = fitted / "evil-model"
    shutil.copytree(tiny_dir, evil_model)
    _evil(evil_model, marker)
    r = _bake_cli(["apply", "--model", evil_model, "--spec", fitted / "spec.json", "--stream", "--out",
                   fitted / "o"], fitted)
    assert not marker.exists() and r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    # 3. diff --format onnx of a directory whose config asks for remote code
    onnx_dir = fitted / "evil-onnx"
    shutil.copytree(tiny_dir, onnx_dir)
    (onnx_dir / "model.onnx").write_bytes(b"not really")
    (onnx_dir / "onnx_info.json").write_text("{}")
    _evil(onnx_dir, marker)
    r = _bake_cli(["diff", "--model", tiny_dir, "--steered", onnx_dir, "--format", "onnx"], fitted)
    assert not marker.exists() and r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "bake: error:" in r.stderr


def _wait_for(pred, timeout: float = 120.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_sigterm_and_kill_leave_no_staging(fitted, tiny_dir):
    prompts = fitted / "many.txt"
    prompts.write_text("\n".join(f"prompt number {i} about the cat" for i in range(60)) + "\n")
    args = [sys.executable, str(ROOT / "cli.py"), "apply", "--model", str(tiny_dir), "--spec",
            str(fitted / "spec.json"), "--prompts", str(prompts), "--out", str(fitted / "o")]
    staged = lambda: any(p.name.startswith(".o.bake-") for p in fitted.iterdir())  # noqa: E731
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(staged), p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "interrupted" in err, err
    assert leftovers(fitted) == [] and not (fitted / "o").exists()
    # kill -9 cannot be handled: the next run into the same --out removes what it left
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(staged), p.communicate()
    p.kill()
    p.wait()
    assert staged()
    r = subprocess.run(args + ["--no-verify"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "left by an interrupted run" in r.stdout and leftovers(fitted) == []
