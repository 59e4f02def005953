"""Fitting: estimators against closed forms, pooled collection, causal estimation, a fitted spec
that bakes exactly."""

from __future__ import annotations

import pytest
import torch

from bake import compiler
from bake.errors import BakeError
from bake.fit import FitConfig, estimators, fit
from bake.fit.collect import collect
from bake.families import adapter_for
from bake.spec import read, write
from conftest import TEXTS, make_llama, save_model


def test_linear_act_recovers_an_exact_transport_map():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(300, 5, generator=g)
    a_true = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.1])
    b_true = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])
    tgt = src * a_true + b_true
    perm = torch.randperm(300, generator=g)
    t = estimators.linear_act(src, tgt[perm])  # unpaired: order must not matter
    assert torch.allclose(t["a"], a_true, atol=1e-5) and torch.allclose(t["b"], b_true, atol=1e-5)


def test_linear_act_unequal_counts_uses_matched_quantiles():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(400, 3, generator=g)
    tgt = 3 * torch.randn(1000, 3, generator=g) + 2  # N(2, 9)
    t = estimators.linear_act(src, tgt)
    assert torch.allclose(t["a"], torch.full((3,), 3.0), atol=0.35)
    assert torch.allclose(t["b"], torch.full((3,), 2.0), atol=0.35)


def test_linear_act_constant_unit_falls_back_to_shift():
    src = torch.zeros(10, 1)
    tgt = torch.arange(10.0)[:, None]
    t = estimators.linear_act(src, tgt)
    assert t["a"].item() == 1.0 and abs(t["b"].item() - 4.5) < 1e-6


def test_mean_act_and_support():
    src = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    tgt = torch.tensor([[1.0, 1.0], [5.0, 1.0]])
    t = estimators.mean_act(src, tgt)
    assert t["a"].tolist() == [1.0, 1.0] and t["b"].tolist() == [2.0, -1.0]
    r = estimators.source_range(src)
    assert r["lo"].tolist() == [0.0, 1.0] and r["hi"].tolist() == [2.0, 3.0]


def test_collect_pools_the_mean_over_non_pad_tokens_after_the_first(tokenizer):
    model = make_llama(seed=1)
    info = adapter_for(model).sites(model)["model.layers.0.mlp.down_proj:input"]
    texts = ["the cat sat on the mat", "go away", "music fills the quiet room tonight"]
    got = collect(model, tokenizer, texts, [info], batch_size=3)[info.name]
    seen = []
    h = model.get_submodule(info.module).register_forward_pre_hook(lambda m, a: seen.append(a[0][0][1:].mean(0)))
    with torch.no_grad():
        for t in texts:  # one at a time: no padding at all
            model(**tokenizer(t, return_tensors="pt"))
    h.remove()
    assert torch.allclose(got, torch.stack(seen), atol=1e-5)


def test_fit_then_apply_exactly(tmp_path, tokenizer):
    model = make_llama(seed=2)
    src_dir = save_model(model, tokenizer, tmp_path / "model")
    source, target = TEXTS[3::2], TEXTS[0::2]
    spec = fit(model, tokenizer, source, target, FitConfig("linear-act", ["post-norms", "mlp-out"], strength=0.8))
    assert len(spec.sites) == 3 * model.config.num_hidden_layers
    assert spec.model["weights_sha256"] and spec.params["causal"] is True
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src_dir), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=8,
                        log=lambda *_: None)
    assert res.verification["passed"] and res.verification["max_rel"] <= 1e-5
    back = read(tmp_path / "s.json")
    assert all(m.strength == 0.8 for _, maps in back.sites for m in maps)


def test_causal_estimation_sees_earlier_maps(tokenizer):
    model = make_llama(seed=3)
    source, target = TEXTS[3::2], TEXTS[0::2]
    causal = fit(model, tokenizer, source, target, FitConfig("mean-act", ["post-norms"], causal=True))
    at_once = fit(model, tokenizer, source, target, FitConfig("mean-act", ["post-norms"], causal=False))
    first_c, first_o = causal.sites[0][1][0].tensors["b"], at_once.sites[0][1][0].tensors["b"]
    assert torch.allclose(first_c, first_o, atol=1e-6)  # nothing upstream of the first site
    last_c, last_o = causal.sites[-1][1][0].tensors["b"], at_once.sites[-1][1][0].tensors["b"]
    assert (last_c - last_o).abs().max() > 1e-4
    # causal mean-act: with every earlier map active, the steered source mean lands on the target mean
    # at the last site, so refitting there gives a zero shift
    from bake.runtime import steered
    info = adapter_for(model).sites(model)[causal.sites[-1][0]]
    pooling = "mean" if causal.params["first_token"].startswith("left out") else "mean+first"  # as the fit pooled
    with steered(model, causal):
        s = collect(model, tokenizer, source, [info], pooling=pooling)[info.name]
    t = collect(model, tokenizer, target, [info], pooling=pooling)[info.name]
    assert (s.mean(0) - t.mean(0)).abs().max() < 1e-4


def test_fit_support_source_range(tokenizer):
    model = make_llama(seed=4)
    spec = fit(model, tokenizer, TEXTS[:6], TEXTS[6:], FitConfig("linear-act", ["mlp-in"], support="source-range",
               causal=False))
    m = spec.sites[0][1][0]
    assert m.has_support and not m.foldable and (m.tensors["lo"] <= m.tensors["hi"]).all()


@pytest.mark.parametrize("kw,msg", [({"method": "magic"}, "--method"), ({"sites": ["nowhere"]}, "--sites"),
                                    ({"support": "all"}, "--support")])
def test_fit_bad_arguments(tokenizer, kw, msg):
    model = make_llama(seed=0)
    args = {"method": "mean-act", "sites": ["post-norms"], **kw}
    with pytest.raises(BakeError, match=msg):
        fit(model, tokenizer, TEXTS[:3], TEXTS[3:6], FitConfig(args["method"], args["sites"], support=kw.get("support", "none")))


def test_layer_replay_equals_full_forward_causal(tokenizer):
    """The replay (one layer per site) must give what a full forward per site gives."""
    from bake.runtime import steered
    from bake.spec import Spec
    from bake.maps import Map

    model = make_llama(seed=5, layers=3)
    source, target = TEXTS[1::2], TEXTS[0::2]
    patterns = ["post-norms", "mlp-in", "residual", "model.norm:output"]
    fast = fit(model, tokenizer, source, target, FitConfig("linear-act", patterns, strength=0.9, batch_size=4))
    ad = adapter_for(model)
    cat = ad.sites(model)
    slow = Spec([])
    pooling = "mean" if fast.params["first_token"].startswith("left out") else "mean+first"  # as the fit pooled
    tgt = collect(model, tokenizer, target, [cat[n] for n in ad.resolve(model, patterns)], pooling=pooling)
    for name in ad.resolve(model, patterns):
        with steered(model, slow, check_model=False):
            s = collect(model, tokenizer, source, [cat[name]], batch_size=3, pooling=pooling)[name]
        slow.sites.append((name, [Map("affine", 0.9, estimators.linear_act(s, tgt[name]))]))
    assert fast.site_names == slow.site_names
    for (_, [mf]), (_, [ms]) in zip(fast.sites, slow.sites):
        for k in ("a", "b"):
            assert torch.allclose(mf.tensors[k], ms.tensors[k], atol=2e-4, rtol=1e-4)


def test_spec_with_shared_tensors_writes(tmp_path):
    from bake.maps import Map
    from bake.spec import Spec

    u = torch.ones(4, 1) / 2
    write(Spec([("a:output", [Map("projection", 1.0, {"U": u})]), ("b:output", [Map("projection", 1.0, {"U": u})])]),
          tmp_path / "s.json")
    assert len(read(tmp_path / "s.json").sites) == 2


def test_linear_act_near_constant_unit_gets_no_slope():
    """Issue 20: σs ≈ 1e-5 used to give a ≈ 1e5 (0.21 → 966); the scale-relative guard gives a shift."""
    g = torch.Generator().manual_seed(0)
    src = torch.cat([0.23 + 1e-5 * torch.randn(64, 1, generator=g), torch.randn(64, 1, generator=g)], 1)
    tgt = torch.cat([0.5 + 0.3 * torch.randn(64, 1, generator=g), 2 * torch.randn(64, 1, generator=g)], 1)
    t = estimators.linear_act(src, tgt)
    assert t["a"][0].item() == 1.0 and abs(t["b"][0].item() - (tgt[:, 0].mean() - src[:, 0].mean()).item()) < 1e-5
    assert 1.5 < t["a"][1].item() < 2.5  # a unit that spreads keeps its fitted slope
    from bake.maps import Map

    sites = [("s0", [Map("affine", 1.0, {"a": torch.tensor([1.0, -3.0]), "b": torch.zeros(2)})]),
             ("s1", [Map("additive", 1.0, {"v": torch.ones(2)})])]
    assert estimators.largest_slope(sites) == {"site": "s0", "unit": 1, "a": 3.0}


def test_aura_reference_sites_preset(tmp_path, tiny_dir, capsys):
    """ml-aura's sites (every MLP Linear's output) as the preset `mlp-linears`; they bake exactly."""
    from bake.cli import main
    from bake.families import adapter_for
    from conftest import TEXTS, make_family

    for family, want in (("llama", ["gate_proj", "up_proj", "down_proj"]), ("gpt2", ["c_fc", "c_proj"])):
        model = make_family(family)
        names = adapter_for(model).resolve(model, ["mlp-linears"])
        assert sorted({n.split(".")[-1].split(":")[0] for n in names}) == sorted(want)
        assert all(n.endswith(":output") for n in names)
    (tmp_path / "s.txt").write_text("\n".join(TEXTS[3::2]) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(TEXTS[0::2]) + "\n")
    assert main(["fit", "--model", str(tiny_dir), "--source", str(tmp_path / "s.txt"), "--target",
                 str(tmp_path / "t.txt"), "--method", "aura", "--sites", "mlp-linears", "--out",
                 str(tmp_path / "a.json")]) == 0
    assert main(["apply", "--model", str(tiny_dir), "--spec", str(tmp_path / "a.json"), "--out",
                 str(tmp_path / "o")]) == 0
    assert "verify: PASS" in capsys.readouterr().out


def test_first_token_is_pooled_unless_bos_or_sink(tiny_dir):
    """Issue 20: mean/max pooling leave the first token out only where it is a BOS or an attention sink
    (decided on the model and recorded in the spec); a random tiny Llama with no BOS has neither."""
    from bake.fit import FitConfig, fit
    from bake.fit.collect import first_token, pool_tokens
    from bake.models import load
    from conftest import TEXTS

    x = torch.tensor([[[100.0], [1.0], [3.0]]])
    mask = torch.ones(1, 3, dtype=torch.long)
    assert pool_tokens(x, mask, "mean").item() == 2.0 and abs(pool_tokens(x, mask, "mean+first").item() - 104 / 3) < 1e-5
    assert pool_tokens(x, mask, "max").item() == 3.0 and pool_tokens(x, mask, "max+first").item() == 100.0
    loaded = load(str(tiny_dir))
    decision = first_token(loaded.model, loaded.tokenizer, TEXTS)
    assert decision["drop"] is False and "no sink" in decision["why"]
    assert first_token(loaded.model, loaded.tokenizer, TEXTS, ratio=0.0)["drop"] is True  # any first token "sinks"
    spec = fit(loaded.model, loaded.tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig("mean-act", ["post-norms"]), progress=False)
    assert spec.params["first_token"].startswith("pooled: ") and spec.params["pooling"] == "mean"
