"""Never wrong, never destructive, round 3 (issue 38): no command writes over its own inputs, counts
and numbers are checked before work, strict JSON, specs of one model compose, degenerate references are
refused. Each case ends in exit 2 with one line and nothing written, or exit 0."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from bake.maps import Map
from bake.spec import Spec, write
from conftest import make_llama, save_model
from test_hardening import D, SITE, fitted, one_error_line, run  # noqa: F401  (fitted: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links followed) by content: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def texts(tmp_path):
    (tmp_path / "src.txt").write_text("you are an idiot\nstupid people ruin everything\n")
    (tmp_path / "tgt.txt").write_text("the cat sat on the mat\nmusic fills the quiet room\n")
    return tmp_path


def _eval(model, out, *more):
    return ["eval", "--model", model, "--task", "perplexity", "--n-sentences", "2", "--strengths", "1",
            "--out", out, *more]


def test_eval_and_fit_never_overwrite_their_inputs(fitted, tiny_dir, texts, capsys):
    """Issue 38 item 1: --out equal to the spec, or inside the model directory, is refused before work."""
    spec = fitted / "spec.json"
    before_spec, before_model = digest(fitted), digest(tiny_dir)
    cases = [
        (_eval(tiny_dir, spec, "--spec", spec), "spec file"),
        (_eval(tiny_dir, tiny_dir / "config.json", "--spec", spec), "model"),
        (_eval(tiny_dir, fitted / "out.json", "--spec", spec, "--plot", spec.with_suffix(".safetensors")),
         "tensor file"),
        (["fit", "--model", tiny_dir, "--source", texts / "src.txt", "--target", texts / "tgt.txt", "--method",
          "mean-act", "--out", tiny_dir / "config.json"], "model"),
        (["fit", "--model", tiny_dir, "--source", texts / "src.txt", "--target", texts / "tgt.txt", "--method",
          "mean-act", "--out", tiny_dir / "new.json"], "inside the model"),
        (["fit", "--model", tiny_dir, "--source", texts / "src.txt", "--target", texts / "tgt.txt", "--method",
          "dsas", "--inner", spec, "--control", texts / "tgt.txt", "--out", spec], "--inner spec"),
    ]
    for args, what in cases:
        code, _, err = run(args, capsys)
        line = one_error_line(err)
        assert code == 2 and what in line, (args, line)
    assert digest(fitted) == before_spec and digest(tiny_dir) == before_model


def test_out_through_links_is_the_input(fitted, tiny_dir, capsys):
    """A symbolic or hard link to the spec is the spec."""
    spec = fitted / "spec.json"
    os.symlink(spec, fitted / "sym.json")
    os.link(spec, fitted / "hard.json")
    before = digest(fitted)
    for out in ("sym.json", "hard.json"):
        code, _, err = run(_eval(tiny_dir, fitted / out, "--spec", spec), capsys)
        assert code == 2 and "spec file" in one_error_line(err)
        code, _, err = run(["invert", spec, "-o", fitted / out, "--force"], capsys)
        assert code == 2 and "spec file" in one_error_line(err)
    assert digest(fitted) == before


def test_compose_and_invert_refuse_inputs_and_existing(fitted, capsys):
    """Items 1 and 8: compose -o / invert -o never write over an input; an existing file needs --force."""
    spec = fitted / "spec.json"
    shutil.copy(spec, fitted / "m.json")  # n.json reads m.safetensors, which writing -o m.json would replace
    shutil.copy(fitted / "spec.safetensors", fitted / "m.safetensors")
    doc = json.loads(spec.read_text())
    doc["tensors"] = "m.safetensors"
    (fitted / "n.json").write_text(json.dumps(doc))
    before = digest(fitted)
    for args in (["compose", spec, "-o", spec, "--force"], ["invert", spec, "-o", spec, "--force"],
                 ["invert", fitted / "n.json", "-o", fitted / "m.json", "--force"]):
        code, _, err = run(args, capsys)
        assert code == 2 and "--out" in one_error_line(err), args
    assert digest(fitted) == before
    code, _, _ = run(["invert", spec, "-o", fitted / "inv.json"], capsys)
    assert code == 0
    mtime = (fitted / "inv.json").stat().st_mtime_ns
    code, _, err = run(["invert", spec, "-o", fitted / "inv.json"], capsys)
    assert code == 2 and "--force" in one_error_line(err)
    code, _, err = run(["compose", spec, fitted / "inv.json", "-o", fitted / "inv.json", "--force"], capsys)
    assert code == 2 and "spec file" in one_error_line(err)
    assert (fitted / "inv.json").stat().st_mtime_ns == mtime
    code, _, _ = run(["compose", spec, spec, "-o", fitted / "inv.json", "--force"], capsys)
    assert code == 0 and json.loads((fitted / "inv.json").read_text())["method"] == "compose"


def test_reports_never_overwrite_inputs(fitted, tiny_dir, capsys):
    """verify --report, diff --report/--json: never an input, nor inside one."""
    spec = fitted / "spec.json"
    before, before_model = digest(fitted), digest(tiny_dir)
    for args in (["verify", "--model", tiny_dir, "--spec", spec, "--baked", tiny_dir, "--report", spec],
                 ["verify", "--model", tiny_dir, "--spec", spec, "--baked", tiny_dir, "--report",
                  tiny_dir / "v.json"],
                 ["diff", "--model", tiny_dir, "--steered", tiny_dir, "--json", tiny_dir / "config.json"],
                 ["diff", "--model", tiny_dir, "--steered", fitted / "spec.json", "--report", fitted / "spec.json"]):
        code, _, err = run(args, capsys)
        assert code == 2 and ("--report" in one_error_line(err) or "--json" in one_error_line(err)), args
    assert digest(fitted) == before and digest(tiny_dir) == before_model


def test_search_out_guarded(tiny_dir, capsys):
    before = digest(tiny_dir)
    code, _, err = run(["search", "--model", tiny_dir, "--trials", "1", "--out", tiny_dir, "--force"], capsys)
    assert code == 2 and "the model" in one_error_line(err)
    assert digest(tiny_dir) == before


def test_eval_out_directory_is_one_line(fitted, tiny_dir, capsys):
    """Item 6: `bake eval --out DIR` was a traceback."""
    (fitted / "d").mkdir()
    code, _, err = run(_eval(tiny_dir, fitted / "d"), capsys)
    assert code == 2 and "is a directory" in one_error_line(err)


@pytest.mark.parametrize("flags,field", [(["--max-kl", "nan"], "--max-kl"), (["--max-kl", "-1"], "--max-kl"),
                                         (["--max-kl", "inf"], "--max-kl"),
                                         (["--startup-trials", "-5"], "--startup-trials")])
def test_search_numbers_checked_before_work(flags, field, tmp_path, capsys):
    """Item 9: no model is loaded (it does not exist) before the numbers are refused."""
    code, _, err = run(["search", "--model", tmp_path / "absent", "--trials", "1", "--out", tmp_path / "o", *flags],
                       capsys)
    assert code == 2 and field in one_error_line(err)
    assert not (tmp_path / "o").exists()


def _chat_model(tmp_path, tokenizer) -> Path:
    tok = tokenizer.__class__.from_pretrained(save_model(make_llama(), tokenizer, tmp_path / "m"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(str(tmp_path / "m"))
    return tmp_path / "m"


def test_search_max_rank_beyond_the_model(tmp_path, tokenizer, capsys):
    """Item 6: --max-rank 100000 was a traceback; it is bounded by the width and the source texts."""
    model = _chat_model(tmp_path, tokenizer)
    code, _, err = run(["search", "--model", model, "--trials", "1", "--n-prompts", "2", "--max-rank", "100000",
                        "--out", tmp_path / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--max-rank" in line and str(D) in line
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_search_stopped_is_one_line_and_writes_nothing(tmp_path, tokenizer, capsys, monkeypatch):
    """Item 6: SIGTERM during a trial: exit 143, no Optuna traceback, no --out."""
    import bake.search as search_mod
    from bake.cli import Terminated

    model = _chat_model(tmp_path, tokenizer)

    def stop(*a, **k):
        raise Terminated()

    monkeypatch.setattr(search_mod, "steered", stop)
    code, out, err = run(["search", "--model", model, "--trials", "2", "--n-prompts", "2", "--max-new-tokens", "2",
                          "--out", tmp_path / "o"], capsys)
    assert code == 143 and "Traceback" not in err + out and "interrupted" in err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_strict_json_everywhere(tmp_path):
    """Item 9: NaN is not JSON; the writers refuse it rather than write what readers reject."""
    from bake.errors import BakeError
    from bake.evaluation import write_json_atomic

    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "t.json", {"max_kl": math.nan})
    assert not (tmp_path / "t.json").exists()
    spec = Spec([(SITE, [Map("additive", 1.0, {"v": torch.ones(D)})])], params={"x": math.inf})
    with pytest.raises(BakeError, match="params or provenance"):
        write(spec, tmp_path / "s.json")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["provenance", "params"])
def test_nan_in_spec_blocks_refused(where, fitted, tiny_dir, capsys):
    """Item 15: NaN counts in a spec's provenance (Python's JSON reader takes them) are refused by name."""
    doc = json.loads((fitted / "spec.json").read_text())
    doc[where] = {"source": {"lines": float("nan")}}
    (fitted / "nan.json").write_text(json.dumps(doc))
    code, _, err = run(["apply", "--model", tiny_dir, "--spec", fitted / "nan.json", "--out", fitted / "o"], capsys)
    assert code == 2 and f"spec.{where}.source.lines" in one_error_line(err)
    assert not (fitted / "o").exists()


def test_unknown_scorer_refused_with_any_task(tiny_dir, tmp_path, capsys):
    """Item 15: --scorer frob was ignored with --task refusal."""
    code, _, err = run(["eval", "--model", tiny_dir, "--task", "refusal", "--scorer", "frob", "--out",
                        tmp_path / "e.json"], capsys)
    assert code == 2 and "--scorer" in one_error_line(err) and "frob" in err
    assert not (tmp_path / "e.json").exists()


def test_eval_refuses_bad_baked_before_work(tiny_dir, tmp_path, capsys, monkeypatch):
    """Item 11: a --baked that cannot be opened is refused before the original is evaluated, and no
    --out is left."""
    import bake.evaluation.sweep as sweep

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    measured = []
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: measured.append(1) or {})
    code, _, err = run(["eval", "--model", tiny_dir, "--task", "perplexity", "--n-sentences", "2", "--baked", bad,
                        "--out", tmp_path / "e.json"], capsys)
    assert code == 2 and "--baked" in one_error_line(err)
    assert measured == [] and not (tmp_path / "e.json").exists()


def test_compose_specs_of_one_model_on_other_sites(capsys, tmp_path):
    """Item 7: two specs fitted on the same model at different sites compose (their whole-model digests
    agree; the legacy per-site hash differs by design)."""
    a, b = ROOT / "examples" / "detox.json", ROOT / "examples" / "detox_caa.json"
    ma, mb = (json.loads(p.read_text())["model"] for p in (a, b))
    assert ma["weights_digest"] == mb["weights_digest"] and ma["weights_sha256"] != mb["weights_sha256"]
    code, out, err = run(["compose", a, b, "-o", tmp_path / "ab.json"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert len(doc["sites"]) == len({e["site"] for p in (a, b) for e in json.loads(p.read_text())["sites"]})
    other = dict(mb, weights_digest="0" * len(mb["weights_digest"]))  # another model still refused
    doc_b = json.loads(b.read_text())
    doc_b["model"] = other
    shutil.copy(b.with_suffix(".safetensors"), tmp_path / "other.safetensors")
    doc_b["tensors"] = "other.safetensors"
    (tmp_path / "other.json").write_text(json.dumps(doc_b))
    code, _, err = run(["compose", a, tmp_path / "other.json", "-o", tmp_path / "x.json"], capsys)
    assert code == 2 and "different models" in one_error_line(err)


def _saved(kind: str, tokenizer, folder: Path, **cfg) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  **cfg)
    return save_model(AutoModelForCausalLM.from_config(config).eval(), tokenizer, folder)


def test_falcon_ablate_with_default_sites(texts, tokenizer, capsys):
    """Item 17: the method's default presets that a model lacks (attn-out, where Falcon's attention writes
    through the MLP's output) are left out when the user named no sites; an explicit one is refused,
    naming only the presets this model offers."""
    model = _saved("falcon", tokenizer, texts / "falcon")
    code, out, err = run(["fit", "--model", model, "--source", texts / "src.txt", "--target", texts / "tgt.txt",
                          "--method", "ablate", "--out", texts / "a.json"], capsys)
    assert code == 0, err
    doc = json.loads((texts / "a.json").read_text())
    assert doc["params"]["sites"] == ["mlp-out"] and len(doc["sites"]) == 2
    code, out, err = run(["apply", "--model", model, "--spec", texts / "a.json", "--out", texts / "o"], capsys)
    assert code == 0 and "verify: PASS" in out, err
    code, _, err = run(["fit", "--model", model, "--source", texts / "src.txt", "--target", texts / "tgt.txt",
                        "--method", "ablate", "--sites", "attn-out", "--out", texts / "b.json"], capsys)
    line = one_error_line(err)
    offered = line.split("(presets: ")[1].split(";")[0].split(", ")
    assert code == 2 and "'attn-out' matches no site" in line and "mlp-out" in offered and "attn-out" not in offered


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_eos_beyond_the_vocabulary(kind, texts, tokenizer, capsys):
    """Item 17: GLM configs name EOS ids (151329 …) beyond a 400-token vocabulary: verify ignores an id no
    model can generate instead of an IndexError."""
    model = _saved(kind, tokenizer, texts / kind, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                   pad_token_id=0)
    assert min(json.loads((model / "generation_config.json").read_text())["eos_token_id"]) >= 400
    code, _, err = run(["fit", "--model", model, "--source", texts / "src.txt", "--target", texts / "tgt.txt",
                        "--method", "ablate", "--out", texts / "a.json"], capsys)
    assert code == 0, err
    code, out, err = run(["apply", "--model", model, "--spec", texts / "a.json", "--out", texts / "o"], capsys)
    assert code == 0 and "verify: PASS" in out and "greedy identical 8/8" in out, err


def test_constant_reference_logits_refused(tiny_dir, tmp_path, capsys):
    """Item 16: a map that drives every logit to exactly 0 (here: the final norm's output scaled to 0)
    gives a hooked reference with no information; verify refuses to call that a pass."""
    from bake.models import load
    from conftest import stamp

    site = "model.norm:output"  # scaled to 0: the tied lm_head (no bias) gives 0 to every token
    spec = stamp(Spec([(site, [Map("affine", 1.0, {"a": torch.zeros(D), "b": torch.zeros(D)})])]),
                 load(str(tiny_dir)).model)
    write(spec, tmp_path / "zero.json")
    code, out, err = run(["apply", "--model", tiny_dir, "--spec", tmp_path / "zero.json", "--out", tmp_path / "o"],
                         capsys)
    assert code == 2 and "same logit to every token" in one_error_line(err) and "PASS" not in out
    assert not (tmp_path / "o").exists()
    half = stamp(Spec([(site, [Map("affine", 0.5, {"a": torch.zeros(D), "b": torch.zeros(D)})])]),
                 load(str(tiny_dir)).model)  # half the way: still informative, and it verifies
    write(half, tmp_path / "half.json")
    code, out, err = run(["apply", "--model", tiny_dir, "--spec", tmp_path / "half.json", "--out", tmp_path / "o"],
                         capsys)
    assert code == 0 and "verify: PASS" in out, err


def test_headline_is_the_first_formats_own_verdict():
    """Item 14: when only the LoRA fails, the safetensors headline says PASS and a last line says what
    failed."""
    from bake.cli import _verification_line

    row = {"prompts": 8, "max_abs": 1e-6, "max_rel": 1e-7, "greedy_same": 8, "criterion": "c"}
    v = {**row, "passed": False, "format": "safetensors", "format_passed": True,
         "lora": {**row, "passed": False, "max_abs": 3.0}}
    lines = _verification_line(v).splitlines()
    assert lines[0].startswith("verify: PASS") and lines[1].startswith("verify (lora, PEFT at scale 1): FAIL")
    assert lines[-1] == "verify: FAIL overall: lora failed"
    v = {**row, "passed": True, "format_passed": True}
    assert _verification_line(v).count("\n") == 0 and _verification_line(v).startswith("verify: PASS")


def test_sandboxed_chat_template_of_a_directory_is_one_line(texts, tokenizer, capsys):
    """Item 6: a transformers directory whose chat template the Jinja sandbox blocks: one line, exit 2
    (the GGUF case is in test_hardening_gguf.py)."""
    model = _chat_model(texts, tokenizer)
    doc = json.loads((model / "tokenizer_config.json").read_text())
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    if "chat_template" in doc:
        doc["chat_template"] = evil
        (model / "tokenizer_config.json").write_text(json.dumps(doc))
    for f in model.glob("chat_template.*"):
        f.write_text(evil if f.suffix == ".jinja" else json.dumps({"chat_template": evil}))
    code, _, err = run(["fit", "--model", model, "--chat", "--source", texts / "src.txt", "--target",
                        texts / "tgt.txt", "--method", "mean-act", "--out", texts / "c.json"], capsys)
    assert code == 2 and "Jinja sandbox" in one_error_line(err)
    assert not (texts / "c.json").exists()
