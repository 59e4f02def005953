"""Every fit method on synthetic activations with a closed-form answer, and on a small model."""

from __future__ import annotations

import pytest
import torch

from bake import compiler
from bake.errors import BakeError
from bake.fit import METHODS, FitConfig, estimators, fit
from bake.fit.collect import _pool
from bake.maps import Map, pwl
from bake.spec import write
from conftest import TEXTS, make_llama, save_model

g = torch.Generator().manual_seed(0)


def test_gaussian_act_matches_moments_and_skips_dead_units():
    src = torch.randn(500, 3, generator=g) * torch.tensor([2.0, 0.5, 0.0]) + torch.tensor([1.0, -1.0, 3.0])
    tgt = torch.randn(400, 3, generator=g) * 3 + 5
    t = estimators.gaussian_act(src, tgt)
    moved = src[:, :2] * t["a"][:2] + t["b"][:2]
    assert torch.allclose(moved.mean(0), tgt[:, :2].mean(0), atol=1e-4)
    assert torch.allclose(moved.std(0, unbiased=False), tgt[:, :2].std(0, unbiased=False), atol=1e-4)
    assert t["a"][2] == 1 and t["b"][2] == 0  # σs = 0: identity


def test_auroc_and_aura():
    pos = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    neg = torch.tensor([[0.0, 2.0, 5.0], [2.0, 2.0, 6.0]])
    auc = estimators.auroc(pos, neg)
    assert auc.tolist() == [0.75, 0.5, 0.0]  # 3 of 4 pairs; all ties; never above
    t = estimators.aura(pos, neg)
    assert t["a"].tolist() == [0.5, 1.0, 1.0] and t["b"].abs().sum() == 0


def test_caa_and_iti_c():
    src = torch.randn(300, 4, generator=g)
    tgt = src + torch.tensor([2.0, 0.0, 0.0, 0.0])  # separable along unit 0 only
    assert torch.allclose(estimators.caa(src, tgt)["v"], torch.tensor([2.0, 0, 0, 0]), atol=1e-5)
    v = estimators.iti_c(src, tgt)["v"]
    n = v / v.norm()
    assert n[0] > 0.95  # the separating normal is unit 0
    assert abs(float(v @ n) - float((tgt.mean(0) - src.mean(0)) @ n)) < 1e-4  # moves by the projected gap


def test_mean_direction_ablation_removes_the_gap():
    src = torch.randn(200, 5, generator=g) + torch.tensor([0, 3.0, 4.0, 0, 0])
    tgt = torch.randn(200, 5, generator=g)
    U = estimators.mean_direction(src, tgt)
    assert abs(float(U.norm()) - 1) < 1e-6
    proj = Map("projection", 1.0, {"U": U})
    gap = proj(src).mean(0) - proj(tgt).mean(0)
    assert gap.abs().max() < 1e-4


def test_lda_direction_weighs_units_by_how_well_they_separate():
    """Unit 0 is an outlier unit (variance 10⁴) with the larger raw mean gap (30 vs 2), unit 1 a
    quiet unit (variance 1) that separates the sets far better: the mean difference points along
    unit 0, the discriminant Σ⁻¹(μs − μt) along unit 1, in closed form (30/10⁴ vs 2/1)."""
    n = 4000
    noise = torch.randn(2 * n, 3, generator=g, dtype=torch.float64) * torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64)
    noise -= torch.cat([noise[:n].mean(0, keepdim=True).expand(n, 3), noise[n:].mean(0, keepdim=True).expand(n, 3)])
    src, tgt = noise[:n] + torch.tensor([30.0, 2.0, 0.0], dtype=torch.float64), noise[n:]
    assert float(estimators.mean_direction(src, tgt)[0, 0]) > 0.99
    var = torch.cat([src - src.mean(0), tgt - tgt.mean(0)]).pow(2).mean(0)
    want = torch.tensor([30.0, 2.0, 0.0], dtype=torch.float64) / var
    U = estimators.lda_direction(src, tgt)
    assert torch.allclose(U[:, 0].double(), want / want.norm(), atol=1e-6)
    assert float(U[1, 0]) > 0.99 and abs(float(U.norm()) - 1) < 1e-6


def test_ablate_directions(tokenizer):
    model = make_llama(seed=14)
    lda = fit(model, tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig("ablate"), progress=False)
    mean = fit(model, tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig("ablate", direction="mean"), progress=False)
    assert lda.params["direction"] == "lda" and mean.params["direction"] == "mean"
    big = lda.params["largest_unit"]  # recorded for the CLI's warning about outlier-unit directions
    U = lda.sites[0][1][0].tensors["U"][:, 0]
    assert big["unit"] == int(U.abs().argmax()) and abs(big["weight"] - float(U.abs().max())) < 1e-4
    u, v = lda.sites[0][1][0].tensors["U"][:, 0], mean.sites[0][1][0].tensors["U"][:, 0]
    assert abs(float(u.norm()) - 1) < 1e-5 and abs(float(u @ v)) < 0.999  # two different unit directions


def test_affine_ablation_moves_the_component_to_the_target_mean():
    src = torch.randn(300, 5, generator=g) + torch.tensor([0, 3.0, 4.0, 0, 0])
    tgt = torch.randn(300, 5, generator=g) + torch.tensor([1.0, -2.0, 1.0, 0, 5.0])
    U = estimators.mean_direction(src, tgt)
    v = estimators.reference_shift(tgt, U)["v"]
    proj, shift = Map("projection", 1.0, {"U": U}), Map("additive", 1.0, {"v": v})
    ace = lambda x: shift(proj(x))  # noqa: E731
    assert (ace(tgt).mean(0) - tgt.mean(0)).abs().max() < 1e-4  # target keeps its mean (zero ablation does not)
    assert (proj(tgt).mean(0) - tgt.mean(0)).abs().max() > 1.0
    assert (ace(src).mean(0) - ace(tgt).mean(0)).abs().max() < 1e-4  # the source's gap along u is gone
    x = torch.randn(7, 5, generator=g)  # off u nothing moves
    step = ace(x) - x
    assert (step - (step @ U) @ U.T).abs().max() < 1e-5


def test_monotone_pwl_is_full_transport():
    src = torch.rand(1000, 2, generator=g)  # U(0, 1)
    tgt = src ** 3  # a monotone non-linear map: its OT map is x ↦ x³
    t = estimators.monotone_pwl(src, tgt, knots=32)
    x = torch.linspace(0.05, 0.95, 50)[:, None].expand(-1, 2)
    assert (pwl(x, t["xs"], t["ys"]) - x ** 3).abs().max() < 0.02
    lin = estimators.linear_act(src, tgt)  # the linear fit cannot follow a cube
    assert (x * lin["a"] + lin["b"] - x ** 3).abs().max() > 0.1
    ties = estimators.monotone_pwl(torch.zeros(10, 1), torch.rand(10, 1, generator=g), knots=4)
    Map("monotone-pwl", 1.0, ties).validate("tied")  # knots nudged apart: still a valid map


def test_pooling_leaves_out_the_first_token_and_padding():
    """The first position (an attention sink: huge activations) is left out of mean and max
    pooling wherever a text has more than one token; a one-token text keeps its token."""
    x = torch.tensor([[[1000.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]], [[7.0], [50.0], [50.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert _pool(x, mask, "mean").flatten().tolist() == [3.0, 5.0, 7.0]
    assert _pool(x, mask, "last").flatten().tolist() == [3.0, 6.0, 7.0]
    assert _pool(x, mask, "max").flatten().tolist() == [3.0, 6.0, 7.0]
    from bake.fit.collect import pool_tokens  # the differentiable form LinEAS trains through

    x.requires_grad_(True)
    pool_tokens(x, mask, "mean").sum().backward()
    assert x.grad[:, :, 0].tolist() == [[0, 1, 0], [0, 0.5, 0.5], [1, 0, 0]]  # no gradient into the sink


FOLDABLE = ["linear-act", "mean-act", "gaussian-act", "aura", "caa", "iti-c", "ablate"]


@pytest.mark.parametrize("method", FOLDABLE)
def test_every_foldable_method_fits_and_bakes_exactly(tmp_path, tokenizer, method):
    model = make_llama(seed=11)
    src_dir = save_model(model, tokenizer, tmp_path / "model")
    spec = fit(model, tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig(method, strength=0.9))
    assert spec.sites and all(m.kind == METHODS[method].kind for _, maps in spec.sites for m in maps)
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src_dir), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=6,
                        log=lambda *_: None)
    assert res.verification["passed"] and res.verification["max_rel"] <= 1e-5


def test_affine_ablation_fits_and_bakes_exactly(tmp_path, tokenizer):
    model = make_llama(seed=13)
    src_dir = save_model(model, tokenizer, tmp_path / "model")
    spec = fit(model, tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig("ablate", strength=0.7, reference="target"))
    assert spec.params["reference"] == "target"
    for _, maps in spec.sites:  # a projection, then the shift back to the target's mean along u
        assert [m.kind for m in maps] == ["projection", "additive"]
        U, v = maps[0].tensors["U"], maps[1].tensors["v"]
        assert torch.allclose(v, U[:, 0] * (U[:, 0] @ v), atol=1e-6)  # v lies along u
    assert len({float(m[1].tensors["v"].norm()) for _, m in spec.sites}) > 1  # each write has its own mean
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src_dir), [str(tmp_path / "s.json")], tmp_path / "out", max_new_tokens=6,
                        log=lambda *_: None)
    assert res.verification["passed"] and res.verification["max_rel"] <= 1e-5


def test_monotone_pwl_fits_but_does_not_fold_yet(tmp_path, tokenizer):
    model = make_llama(seed=12)
    src_dir = save_model(model, tokenizer, tmp_path / "model")
    spec = fit(model, tokenizer, TEXTS[:6], TEXTS[6:], FitConfig("monotone-pwl", ["mlp-in"], knots=4))
    assert spec.sites[0][1][0].tensors["xs"].shape[1] == 4
    write(spec, tmp_path / "s.json")
    with pytest.raises(BakeError, match="piecewise-linear"):
        compiler.apply(str(src_dir), [str(tmp_path / "s.json")], tmp_path / "out", log=lambda *_: None)


@pytest.mark.parametrize("kw,msg", [({"method": "caa", "support": "source-range"}, "--support"),
                                    ({"method": "monotone-pwl", "knots": 50}, "--knots"),
                                    ({"method": "mean-act", "pooling": "median"}, "--pooling"),
                                    ({"method": "ablate", "direction_layer": 9}, "--direction-layer"),
                                    ({"method": "ablate", "sites": ["mlp-in"]}, "ablate applies"),
                                    ({"method": "ablate", "reference": "source"}, "--reference"),
                                    ({"method": "caa", "reference": "target"}, "--reference"),
                                    ({"method": "lineas", "reference": "target"}, "--reference"),
                                    ({"method": "ablate", "direction": "pca"}, "--direction"),
                                    ({"method": "caa", "direction": "lda"}, "--direction")])
def test_method_options_are_checked(tokenizer, kw, msg):
    model = make_llama(seed=0)
    with pytest.raises(BakeError, match=msg):
        fit(model, tokenizer, TEXTS[:6], TEXTS[6:], FitConfig(**kw))
