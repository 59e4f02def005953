"""Inserted modules: maps that cannot fold (piecewise-linear, support-masked affine, gated) become
small modules in the forward pass; exact vs the hooked reference in PyTorch (generated code) and
ONNX; the generated code loads in a fresh process; no code where everything folds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.fit import FitConfig, fit
from bake.maps import Map
from bake.families import adapter_for
from bake.ort import load_onnx
from bake.runtime import steered
from bake.spec import Spec, write
from conftest import TEXTS, make_llama, save_model, stamp


def _baked(tmp, src, kind: str):
    """The `kind` spec baked with inserted modules (reused across tests when present)."""
    out = tmp / f"out_{kind}"
    if not out.is_dir():
        compiler.apply(str(src), [str(tmp / f"{kind}.json")], out, insert_modules=True, run_verify=False,
                      log=lambda *_: None)
    return out


def _gated_spec(model, seed: int) -> Spec:
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    ad = adapter_for(model)
    sites = []
    inners = [Map("affine", 1.0, {"a": 1 + 0.3 * torch.randn(d, generator=g), "b": 0.2 * torch.randn(d, generator=g)}),
              Map("additive", 1.0, {"v": 0.5 * torch.randn(d, generator=g)}),
              Map("projection", 1.0, {"U": torch.linalg.qr(torch.randn(d, 1, generator=g))[0]})]
    for i, name in enumerate(ad.resolve(model, ["post-norms"])):
        gate = Map("gated", 0.9, {"w": torch.randn(d, generator=g) / d ** 0.5, "c": torch.tensor([0.2])},
                   inner=inners[i % 3])
        maps = [gate] if i % 2 else [Map("additive", 0.7, {"v": 0.1 * torch.randn(d, generator=g)}), gate]
        sites.append((name, maps))
    return stamp(Spec(sites, method="test-gated"), model)


def _two_sided_spec(model, seed: int) -> Spec:
    """Gated maps (never fold) at both the input and the output of each down projection: one module,
    two inserted modules."""
    g = torch.Generator().manual_seed(seed)
    ad = adapter_for(model)
    cat = ad.sites(model)
    sites = []
    for name in ad.resolve(model, ["mlp-in", "mlp-out"]):
        d = cat[name].units
        sites.append((name, [Map("gated", 0.8, {"w": torch.randn(d, generator=g) / d ** 0.5, "c": torch.tensor([0.1])},
                                 inner=Map("additive", 1.0, {"v": 0.5 * torch.randn(d, generator=g)}))]))
    return stamp(Spec(sites, method="test-two-sided"), model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_tokenizer

    tmp = tmp_path_factory.mktemp("ins")
    tok = make_tokenizer()
    model = make_llama(seed=17, layers=3)
    src = save_model(model, tok, tmp / "model")
    specs = {
        "pwl": fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("monotone-pwl", ["post-norms"], strength=0.8, knots=6)),
        "support": fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("linear-act", ["post-norms", "attn-out"],
                       strength=0.9, support="source-range")),
        "gated": _gated_spec(model, 3),
        "both": _two_sided_spec(model, 4),
    }
    for k, s in specs.items():
        write(s, tmp / f"{k}.json")
    return tmp, src, model, tok


@pytest.mark.parametrize("kind", ["pwl", "support", "gated", "both"])
def test_inserted_modules_match_the_reference_in_pytorch_and_onnx(model_dir, kind):
    tmp, src, _, _ = model_dir
    res = compiler.apply(str(src), [str(tmp / f"{kind}.json")], tmp / f"out_{kind}", formats=["safetensors", "onnx"],
                        insert_modules=True, log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["max_rel"] <= 1e-5 and v["greedy_same"] == v["prompts"], v
    o = v["onnx"]
    # ONNX Runtime rounds differently; where the float32 error passes 1e-5 (piecewise-linear maps
    # with close knots amplify rounding), verify's float64 yardstick decides, as for any model
    assert o["passed"] and o["greedy_same"] == o["prompts"], o
    assert o["max_rel"] <= 1e-5 or o["baked_vs_fp64_max_abs"] <= 1.5 * o["hooked_fp32_vs_fp64_max_abs"], o
    out = tmp / f"out_{kind}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bake.BakeForCausalLM" and cfg["bake_inserted"]
    assert "trust_remote_code=True" in (out / "README.md").read_text()


RELOAD = """
import sys, torch, json
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[5, 17, 33, 8, 91, 4]])
with torch.no_grad():
    print(json.dumps({"cls": type(m).__name__, "logits": m(ids).logits[0, -1, :8].tolist()}))
"""


def test_generated_code_loads_in_a_fresh_process(model_dir):
    tmp, src, model, _ = model_dir
    out = _baked(tmp, src, "gated")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, cwd=str(tmp))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    from bake.spec import read

    with torch.no_grad(), steered(model, read(tmp / "gated.json")):
        ref = model(torch.tensor([[5, 17, 33, 8, 91, 4]])).logits[0, -1, :8]
    assert got["cls"] == f"Bake{type(model).__name__}"  # named after the stock class it extends
    assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-5)


def test_steering_survives_kernelization_and_wraps_a_kernel_forward(model_dir):
    """transformers >= 5.25 kernelizes a model after loading it (norms and MLPs get the class forward
    back, or a hub kernel's): the steering must stay in front of whatever forward is chosen."""
    import types

    from transformers import AutoModelForCausalLM

    from bake.spec import read

    tmp, src, model, _ = model_dir
    out = _baked(tmp, src, "pwl")
    m = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ids = torch.tensor([[5, 17, 33, 8, 91, 4]])
    with torch.no_grad():
        before = m(ids).logits
        with steered(model, read(tmp / "pwl.json")):
            ref = model(ids).logits
        assert torch.allclose(before, ref, atol=1e-5)  # the steering is there after from_pretrained's kernelize
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)  # and it moves the model
        if hasattr(m, "set_use_kernels"):
            m.set_use_kernels(True)  # what from_pretrained does last
        assert torch.equal(m(ids).logits, before)
        site = m.config.bake_inserted[0]["module"]
        mod = m.get_submodule(site)
        calls = []

        def kernel(self, *a, **k):  # a stand-in hub kernel: the class forward, counted
            calls.append(1)
            return type(self).forward(self, *a, **k)

        mod.forward = types.MethodType(kernel, mod)  # as kernels' _replace_forward does
        sys.modules[type(m).__module__].route(mod)
        assert torch.equal(m(ids).logits, before) and calls


def test_gates_are_batch_independent_and_ignore_padding(model_dir):
    from transformers import AutoModelForCausalLM

    tmp, src, _, tok = model_dir
    out = tmp / "out_gb"
    compiler.apply(str(src), [str(tmp / "gated.json")], out, formats=["safetensors", "onnx"], insert_modules=True,
                  run_verify=False, log=lambda *_: None)
    pt = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    onnx_model, _ = load_onnx(out, "cpu")
    tok.padding_side = "left"
    prompts = [TEXTS[3], TEXTS[10] + " " + TEXTS[11]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    for m in (pt, onnx_model):
        with torch.no_grad():
            both = m(**enc).logits
            for i, p in enumerate(prompts):
                alone = m(**tok([p], return_tensors="pt")).logits[0]
                n = alone.shape[0]
                assert torch.allclose(both[i, -n:], alone, atol=1e-4), (type(m).__name__, i)


def test_refused_without_the_flag_and_no_code_when_everything_folds(model_dir, tmp_path, capsys):
    tmp, src, model, tok = model_dir
    code = main(["apply", "--model", str(src), "--spec", str(tmp / "pwl.json"), "--out", str(tmp_path / "x")])
    assert code == 2 and "--insert-modules" in capsys.readouterr().err and not (tmp_path / "x").exists()
    code = main(["apply", "--model", str(src), "--spec", str(tmp / "pwl.json"), "--out", str(tmp_path / "x"),
                 "--insert-modules", "--no-verify"])
    said = capsys.readouterr().out.splitlines()[-1]  # the summary line says how the checkpoint loads
    assert code == 0 and "trust_remote_code=True" in said and "stock" not in said, said
    write(fit(model, tok, TEXTS[1::2], TEXTS[0::2], FitConfig("mean-act", ["post-norms"])), tmp_path / "m.json")
    res = compiler.apply(str(src), [str(tmp_path / "m.json")], tmp_path / "folded", insert_modules=True,
                        log=lambda *_: None)
    assert res.verification["passed"] and not (tmp_path / "folded" / "modeling_bake.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "folded" / "config.json").read_text())
    # verify runs generated code only when asked to
    out = _baked(tmp, src, "pwl")
    base = ["verify", "--model", str(src), "--spec", str(tmp / "pwl.json"), "--baked", str(out), "--max-new-tokens", "4"]
    assert main(base) == 2 and "--trust-remote-code" in capsys.readouterr().err
    assert main(base + ["--trust-remote-code"]) == 0


def test_approximate_folds_support_masked_maps_and_reports_the_error(model_dir, tmp_path, capsys):
    tmp, src, _, _ = model_dir
    out = tmp_path / "approx"
    code = main(["apply", "--model", str(src), "--spec", str(tmp / "support.json"), "--out", str(out), "--approximate"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "modeling_bake.py").exists()  # a stock checkpoint
    rep = json.loads((out / "bake_report.json").read_text())
    v = rep["verification"]
    assert v["approximate"] is True and v["max_rel"] > 1e-5  # the support mattered; the error is reported
    assert any("approximate" in p["did"] for p in rep["passes"])
    assert "approximate" in (out / "README.md").read_text()


def test_diff_refuses_generated_code_unless_trusted(model_dir, capsys):
    tmp, src, _, _ = model_dir
    out = _baked(tmp, src, "pwl")
    (tmp / "p.txt").write_text("\n".join(TEXTS[:2]))
    base = ["diff", "--model", str(src), "--steered", str(out), "--prompts", str(tmp / "p.txt"),
            "--max-new-tokens", "3"]
    assert main(base) == 2 and "--trust-remote-code" in capsys.readouterr().err
    assert main(base + ["--trust-remote-code"]) == 0
    assert "diff:" in capsys.readouterr().out


def test_eval_of_a_checkpoint_with_inserted_modules_matches_the_hooked_spec(model_dir, tmp_path):
    from bake.evaluation import EvalConfig
    from bake.evaluation.sweep import run
    from bake.spec import read

    tmp, src, _, _ = model_dir
    out = _baked(tmp, src, "pwl")
    cfg = EvalConfig(tasks=["toxicity", "perplexity"], prompts=TEXTS[:3], sentences=TEXTS[3:6], seeds=[0],
                     max_new_tokens=4, batch_size=3)
    spec = read(tmp / "pwl.json")
    doc = run(str(src), cfg, tmp_path / "e.json", [spec], [spec.sites[0][1][0].strength], str(out), None,
              log=lambda *_: None, trust_code=True)
    pts = {p["label"]: p for p in doc["points"]}
    hooked = next(p for k, p in pts.items() if k.startswith("λ="))
    assert pts["baked"]["toxicity"]["examples"] == hooked["toxicity"]["examples"]
    assert abs(pts["baked"]["perplexity"]["perplexity"] / hooked["perplexity"]["perplexity"] - 1) < 1e-5
