"""Where verify and diff run their models (`--device`, `--device-map`): bad placements are one exit-2 error
naming the flag, before anything loads or is written; diff holding one model at a time gives what both
resident give."""

from __future__ import annotations

import json

import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.diff import DiffOptions, compare, run
from bake.maps import Map
from bake.models import fingerprint, load
from bake.spec import Spec, write

SITE = "model.layers.0.mlp.down_proj:output"


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_dir):
    """An additive spec baked into the tiny Llama (verified by apply)."""
    from bake.families import adapter_for

    tmp = tmp_path_factory.mktemp("placement")
    loaded = load(str(tiny_dir))
    info = adapter_for(loaded.model).sites(loaded.model)[SITE]
    torch.manual_seed(0)
    spec = Spec([(SITE, [Map("additive", 0.7, {"v": torch.randn(64)})])], method="caa",
                model=fingerprint(loaded.model, [info]))
    write(spec, tmp / "spec.json")
    compiler.apply(str(tiny_dir), [str(tmp / "spec.json")], tmp / "out", log=lambda *_: None)
    return tmp


BAD = ([["--device", "cuda"]] if not torch.cuda.is_available() else []) + [["--device-map", "everywhere"]]


@pytest.mark.parametrize("flags", BAD)
@pytest.mark.parametrize("command", ["apply", "verify", "diff"])
def test_a_bad_placement_is_one_error_naming_the_flag(baked, tiny_dir, capsys, flags, command):
    args = {"apply": ["apply", "--model", str(tiny_dir), "--spec", str(baked / "spec.json"),
                      "--out", str(baked / "never")],
            "verify": ["verify", "--model", str(tiny_dir), "--spec", str(baked / "spec.json"),
                       "--baked", str(baked / "out"), "--report", str(baked / "never.json")],
            "diff": ["diff", "--model", str(tiny_dir), "--steered", str(baked / "out"),
                     "--json", str(baked / "never.json")]}[command]
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert f"bake: error: {flags[0]}" in err and "Traceback" not in err, err
    assert not (baked / "never").exists() and not (baked / "never.json").exists()


def test_diff_one_model_at_a_time_equals_both_resident(baked, tiny_dir, tmp_path):
    prompts = ["the cat sat on the mat", "you are an idiot and i hate you", "music fills", "go away"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    doc = run(DiffOptions(model=str(tiny_dir), steered=str(baked / "out"), prompts=str(tmp_path / "p.txt"),
                          max_new_tokens=8, json=str(tmp_path / "d.json")))
    original, steered = load(str(tiny_dir)), load(str(baked / "out"))
    both = compare(original.model, steered.model, original.tokenizer, prompts, 8)
    assert json.loads((tmp_path / "d.json").read_text())["summary"]["prompts"] == 4
    one, two = doc["summary"], both["summary"]
    assert one["kl_mean"] > 1e-4  # the spec moves the model
    assert abs(one["kl_mean"] - two["kl_mean"]) <= 1e-6 * two["kl_mean"]
    assert one["top1_agreement"] == two["top1_agreement"] and one["greedy_same"] == two["greedy_same"]
    for r, s in zip(doc["rows"], both["rows"]):
        assert (r["original"], r["steered"]) == (s["original"], s["steered"])
