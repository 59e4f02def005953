"""DSAS: per-site logistic detectors gate an inner map per token; fitted, then baked as inserted modules."""

from __future__ import annotations

import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.fit import FitConfig, estimators, fit
from bake.spec import Spec, read, write
from conftest import TEXTS, make_llama, save_model


def test_logistic_detector_in_raw_coordinates_and_pca_folded_back():
    g = torch.Generator().manual_seed(0)
    d = 10
    shift = torch.zeros(d)
    shift[3] = 3.0
    pos = torch.randn(200, d, generator=g) * 2 + 5 + shift  # offset and scale: raw coordinates matter
    neg = torch.randn(200, d, generator=g) * 2 + 5
    w, c = estimators.logistic(pos, neg)
    acc = torch.cat([(pos.double() @ w + c > 0).double(), (neg.double() @ w + c <= 0).double()]).mean()
    # the Bayes rate for a gap of 3 at σ = 2 is Φ(0.75) = 0.773; the boundary sits half-way between the means
    assert 0.72 < acc < 0.86 and w.abs().argmax() == 3
    mid = torch.full((d,), 5.0, dtype=torch.float64)
    mid[3] = 6.5
    assert abs(float(mid @ w + c)) < 0.3
    wp, cp = estimators.logistic(pos, neg, pca=3)  # fitted on 3 components, folded into one vector
    assert wp.shape == (d,)
    accp = torch.cat([(pos.double() @ wp + cp > 0).double(), (neg.double() @ wp + cp <= 0).double()]).mean()
    assert accp > 0.6


@pytest.fixture()
def setup(tmp_path, tokenizer):
    model = make_llama(seed=23, layers=2)
    src = save_model(model, tokenizer, tmp_path / "m")
    (tmp_path / "s.txt").write_text("\n".join(TEXTS[1::2]))
    (tmp_path / "t.txt").write_text("\n".join(TEXTS[0::2]))
    (tmp_path / "c.txt").write_text("\n".join(TEXTS[0::2][::-1]))
    return tmp_path, src, model, tokenizer


def test_dsas_fits_gates_and_bakes_them_as_modules(setup):
    tmp, src, model, tok = setup
    spec = fit(model, tok, TEXTS[1::2], TEXTS[0::2],
               FitConfig("dsas", ["post-norms"], strength=0.9, inner="mean-act", min_accuracy=0.5), control=TEXTS[0::2])
    assert spec.sites and all(m.kind == "gated" and m.inner.kind == "affine" for _, ms in spec.sites for m in ms)
    acc = spec.params["detector_accuracy"]
    assert len(acc) == spec.params["candidate_sites"] == 4
    assert all(v >= 0.5 for n, v in acc.items() if n in dict(spec.sites))
    write(spec, tmp / "g.json")
    res = compiler.apply(str(src), [str(tmp / "g.json")], tmp / "out", formats=["safetensors", "onnx"],
                        insert_modules=True, log=lambda *_: None)
    assert res.verification["passed"] and res.verification["onnx"]["passed"]
    # the threshold keeps exactly the sites whose held-out accuracy reaches it (same seed, same split);
    # above every detector's accuracy it is a clear error
    best = max(acc.values())
    strict = fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("dsas", ["post-norms"], inner="mean-act",
                 min_accuracy=max(best, 0.5)), control=TEXTS[0::2])
    assert set(dict(strict.sites)) == {n for n, v in acc.items() if v >= max(best, 0.5)}
    if best < 1.0:
        from bake.errors import BakeError

        with pytest.raises(BakeError, match="no site's detector"):
            fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("dsas", ["post-norms"], inner="mean-act",
                min_accuracy=min(1.0, best + 0.01)), control=TEXTS[0::2])


def test_dsas_gates_a_given_spec_with_its_strength_folded_in(setup):
    tmp, src, model, tok = setup
    inner = fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("mean-act", ["post-norms"], strength=0.5))
    write(inner, tmp / "inner.json")
    spec = fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("dsas", inner=str(tmp / "inner.json"),
               min_accuracy=0.5), control=TEXTS[0::2])
    name, maps = spec.sites[0]
    b_inner = dict(inner.sites)[name][0].tensors["b"]
    assert torch.allclose(maps[0].inner.tensors["b"], 0.5 * b_inner) and maps[0].inner.strength == 1.0


def test_dsas_bad_input(setup, capsys):
    tmp, src, _, _ = setup
    base = ["fit", "--model", str(src), "--method", "dsas", "--source", str(tmp / "s.txt"),
            "--target", str(tmp / "t.txt"), "--out", str(tmp / "o.json")]
    for extra, msg in [([], "--control"), (["--control", str(tmp / "c.txt")], "--inner"),
                       (["--control", str(tmp / "c.txt"), "--inner", "mean-act", "--min-accuracy", "1.5"],
                        "--min-accuracy"),
                       (["--control", str(tmp / "c.txt"), "--inner", "mean-act", "--pca", "0"], "--pca"),
                       (["--control", str(tmp / "c.txt"), "--inner", "lineas"], "--inner")]:
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not (tmp / "o.json").exists()
    no_target = base[:7] + base[9:]
    assert no_target.count("--target") == 0
    # a method fitted on --source/--target needs --target; gating a given spec file does not
    assert main(no_target + ["--control", str(tmp / "c.txt"), "--inner", "mean-act"]) == 2
    assert "--target: required" in capsys.readouterr().err
    code = main(base + ["--control", str(tmp / "c.txt"), "--inner", "mean-act", "--min-accuracy", "0.5"])
    assert code == 0 and "dsas: kept" in capsys.readouterr().out
    assert read(tmp / "o.json").method == "dsas"
    inner = read(tmp / "o.json")
    write(Spec([(s, [m[0].inner]) for s, m in inner.sites], method="mean-act", model=inner.model), tmp / "inner.json")
    assert main(no_target + ["--control", str(tmp / "c.txt"), "--inner", str(tmp / "inner.json"),
                             "--min-accuracy", "0.5", "--out", str(tmp / "o2.json")]) == 0
    assert read(tmp / "o2.json").method == "dsas" and "target" not in read(tmp / "o2.json").provenance


def test_joint_gates_keep_control_texts_in_place(setup):
    """--joint: gates trained with the maps and a retain term move the control texts' activations
    less than the same maps trained ungated, while still moving the source towards the target."""
    from bake.fit.collect import collect
    from bake.fit.lineas import LineasConfig, w2_per_unit
    from bake.families import adapter_for
    from bake.runtime import steered

    tmp, src, model, tok = setup
    source, target = TEXTS[1::2], TEXTS[0::2]
    control = ["The weather is mild today.", "Trains leave every ten minutes.", "She planted tomatoes in May.",
               "The library opens at nine.", "Water boils at one hundred degrees.", "He painted the fence blue.",
               "The museum has a new exhibit.", "Our meeting moved to Tuesday."]
    kw = dict(steps=120, lr=5e-2, batch_size=8, seed=0)
    joint = fit(model, tok, source, target, FitConfig("dsas", ["post-norms"], joint=True,
                lineas=LineasConfig(retain=5.0, **kw)), control=control, progress=False)
    plain = fit(model, tok, source, target, FitConfig("lineas", ["post-norms"], lineas=LineasConfig(**kw)), progress=False)
    assert all(m.kind == "gated" and m.inner.kind == "affine" for _, ms in joint.sites for m in ms)
    infos = [adapter_for(model).sites(model)[n] for n, _ in joint.sites]

    def drift(spec, texts):
        clean = collect(model, tok, texts, infos, 16, progress=False)
        with steered(model, spec):
            moved = collect(model, tok, texts, infos, 16, progress=False)
        return sum(float(((moved[i.name] - clean[i.name]) ** 2).sum(-1).mean()) for i in infos)

    assert drift(joint, control) < drift(plain, control)
    t = collect(model, tok, target, infos, 16, progress=False)
    with steered(model, joint):
        s = collect(model, tok, source, infos, 16, progress=False)
    s0 = collect(model, tok, source, infos, 16, progress=False)
    w2 = lambda a: sum(float(w2_per_unit(a[i.name], t[i.name]).sum()) for i in infos)  # noqa: E731
    assert w2(s) < w2(s0)
    write(joint, tmp / "joint.json")
    res = compiler.apply(str(src), [str(tmp / "joint.json")], tmp / "jout", insert_modules=True, log=lambda *_: None)
    assert res.verification["passed"]


def test_joint_cli_trains_like_lineas(setup, capsys):
    """`bake fit --method dsas --joint` samples LinEAS's per-step batch (8 by default, not the
    activation-collection batch of 16) and records its training settings in the spec."""
    tmp, src, _, _ = setup
    base = ["fit", "--model", str(src), "--method", "dsas", "--joint", "--source", str(tmp / "s.txt"),
            "--target", str(tmp / "t.txt"), "--control", str(tmp / "c.txt"), "--steps", "2",
            "--out", str(tmp / "j.json")]
    assert main(base + ["--retain", "-1"]) == 2 and "--retain" in capsys.readouterr().err
    assert not (tmp / "j.json").exists()
    assert main(base) == 0
    p = read(tmp / "j.json").params
    assert (p["joint"], p["batch_size"], p["steps"], p["optimizer"], p["retain"]) == (True, 8, 2, "adam", 1.0)
    assert main(base + ["--batch-size", "4", "--retain", "0.5"]) == 0
    p = read(tmp / "j.json").params
    assert (p["batch_size"], p["retain"]) == (4, 0.5)
