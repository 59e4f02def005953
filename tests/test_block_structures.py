"""One tiny random model per block structure that bake's probe reads (dense layers are in
test_probe.py): parallel attention/MLP, mixtures of experts with fused 3-D expert weights (with and
without biases, with a shared expert), dense-then-MoE layers with MLA attention, a state-space
hybrid and fused projections. Random affine / additive / projection specs at every site group are
compiled (folded, or kept as inserted modules where a fold is refused) and compared with the hooked
reference; what must fold for each structure is asserted to fold. The full sweep over every model
type is benchmarks/families_sweep.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bake import passes
from bake.cli import main
from bake.errors import BakeError
from bake.families import adapter_for
from bake.families.tiny import build
from bake.plan import bind
from bake.runtime import steered
from conftest import TEXTS, make_tokenizer
from test_differential import random_spec

GROUPS = (["post-norms"], ["attn-out", "mlp-out", "mlp-in"], ["residual"], ["**"])


def compiled_vs_hooked(model, spec) -> tuple[float, bool]:
    """(relative logit error of the compiled copy vs the hooked reference, whether it needed inserted
    modules)."""
    inserted = False
    baked = copy.deepcopy(model)
    plan = bind([spec], baked, check_model=False)
    try:
        passes.run(plan)
    except BakeError:
        baked = copy.deepcopy(model)
        plan = bind([spec], baked, check_model=False)
        plan.insert_modules = inserted = True
        passes.run(plan)
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with steered(model, [spec], check_model=False):
            ref = model(ids).logits
        got = plan.model(ids).logits
    return float((got - ref).abs().max() / ref.abs().max()), inserted


def groups(model) -> dict[str, tuple[float, bool]]:
    have = adapter_for(model).presets
    out = {}
    for k, pats in enumerate(GROUPS):
        pats = [p for p in pats if p in have or p == "**"]
        if pats:
            out[",".join(pats)] = compiled_vs_hooked(model, random_spec(model, pats, 20 + k))
    return out


def folds(model, sites: list[str], kind: str, seed: int = 0) -> bool:
    """True if a random map of `kind` at every site of `sites` folds with no inserted module (and equals
    the reference)."""
    from bake.maps import MAP_KINDS
    from bake.spec import Spec

    ad = adapter_for(model)
    cat = ad.sites(model)
    gen = torch.Generator().manual_seed(seed)
    spec = Spec([(s, [MAP_KINDS[kind].example(cat[s].units, gen)]) for s in ad.resolve(model, sites)], method="t")
    err, inserted = compiled_vs_hooked(model, spec)
    assert err <= 1e-5, (sites, kind, err)
    return not inserted


@pytest.mark.parametrize("model_type", ["gptj", "mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3", "falcon_h1",
                                        "phi3"])
def test_every_block_structure_compiles_equal_to_the_hooked_reference(model_type):
    model = build(model_type)
    ad = adapter_for(model)
    assert ad.about.startswith("derived by bake's probe")
    for pats, (err, _) in groups(model).items():
        assert err <= 1e-5, (model_type, pats, err)


def test_parallel_block_has_both_writers():
    """GPT-J: attention and MLP read ln_1 and both add into the stream (b = a + o1 + o2)."""
    model = build("gptj")
    ad = adapter_for(model)
    assert ad.residual_writer == "mlp.fc_out" and ad.presets["attn-out"] == ("transformer.h.*.attn.out_proj:output",)
    assert folds(model, ["residual"], "additive")  # into fc_out's bias
    assert folds(model, ["attn-out", "mlp-out"], "projection")


def test_mixture_of_experts_folds_into_router_and_every_expert():
    """Mixtral: the MoE block output is a sum site over the 3-D down projections; its norm is read by the
    router and the 3-D gate/up weights. Linear maps fold there; a shift is refused with the MoE reason."""
    model = build("mixtral")
    ad = adapter_for(model)
    cat = ad.sites(model)
    out = cat["model.layers.0.mlp:output"]
    assert out.role == "sum" and [s.param for s in out.slots] == ["model.layers.0.mlp.experts.down_proj"]
    norm = cat["model.layers.0.post_attention_layernorm:output"]
    assert {s.param.rsplit(".", 1)[-1] for s in norm.slots} == {"weight", "gate_up_proj"}
    assert folds(model, ["mlp-out"], "projection")
    assert folds(model, ["post-norms"], "projection")  # a dense map into q/k/v and into router + experts
    assert not folds(model, ["residual"], "additive")  # no expert bias: kept as an inserted module


def test_expert_biases_take_a_shift_where_router_weights_sum_to_one():
    """gpt-oss: experts stored [E, in, out] (x @ W) with biases, softmax over the chosen experts: a shift
    on the layer output folds into every expert's down bias, and one at the MoE norm into the router's and
    every expert's gate/up bias."""
    model = build("gpt_oss")
    cat = adapter_for(model).sites(model)
    assert cat["model.layers.0:output"].shift_slots and cat["model.layers.0.mlp:output"].shift_slots
    assert folds(model, ["residual"], "additive")
    assert folds(model, ["mlp-out"], "affine")
    assert folds(model, ["model.layers.*.post_attention_layernorm:output"], "affine")


def test_layers_built_differently_get_their_own_graphs():
    """DeepSeek-V3 (MLA attention; layer 0 dense, layer 1 MoE with a shared expert): one graph per kind."""
    model = build("deepseek_v3")
    ad = adapter_for(model)
    assert ad.per_layer and ad.per_layer[0] != ad.per_layer[1]
    cat = ad.sites(model)
    assert cat["model.layers.0.mlp.down_proj:output"].role == "linear"
    assert cat["model.layers.1.mlp:output"].role == "sum"
    assert folds(model, ["attn-out", "mlp-out"], "projection")


def test_cli_fit_apply_verify_on_a_mixture_of_experts(tmp_path, capsys):
    """The user's path on Mixtral: ablate folds into a stock checkpoint; caa is refused naming the MoE
    reason, before anything is written, and bakes with --insert-modules."""
    model = build("mixtral")
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "s.txt").write_text("\n".join(TEXTS[1::2]))
    (tmp_path / "t.txt").write_text("\n".join(TEXTS[0::2]))
    fit = ["fit", "--model", str(tmp_path / "m"), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt")]
    assert main(fit + ["--method", "ablate", "--out", str(tmp_path / "a.json")]) == 0
    assert main(["apply", "--model", str(tmp_path / "m"), "--spec", str(tmp_path / "a.json"), "--out",
                 str(tmp_path / "oa")]) == 0
    rep = json.loads((tmp_path / "oa" / "bake_report.json").read_text())
    assert rep["verification"]["passed"] and not (tmp_path / "oa" / "modeling_bake.py").exists()
    assert any("producer weight(s)" in p["did"] for p in rep["passes"])
    assert main(fit + ["--method", "caa", "--out", str(tmp_path / "c.json")]) == 0
    capsys.readouterr()
    base = ["apply", "--model", str(tmp_path / "m"), "--spec", str(tmp_path / "c.json"), "--out", str(tmp_path / "oc")]
    assert main(base) == 2 and "mixture of experts" in capsys.readouterr().err
    assert not (tmp_path / "oc").exists()
    assert main(base + ["--insert-modules"]) == 0
    assert json.loads((tmp_path / "oc" / "bake_report.json").read_text())["verification"]["passed"]


def test_families_prints_any_type_and_every_type(capsys):
    """`bake families --type` probes a tiny model of any causal-LM type; `--all` prints the shipped sweep."""
    assert main(["families", "--type", "mixtral", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mlp-out"]["projection"] == "stock" and rows["mlp-out"]["additive"] == "inserted module"
    assert main(["families", "--all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_type = {r["model_type"]: r for r in doc["rows"]}
    assert by_type["llama"]["status"] == "all three fold and verify"
    assert by_type["bert"]["status"].startswith("out of scope")
    assert all(r["status"] for r in doc["rows"]) and len(doc["rows"]) > 150
    assert main(["families", "--type", "no_such_type"]) == 2
    assert "no_such_type" in capsys.readouterr().err
