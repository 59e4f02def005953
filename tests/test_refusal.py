"""`bake eval --task refusal`: the vendored and built prompt sets and their splits, the two refusal
detectors, heretic's first-token KL, and a run on the embedded chat model (SmolLM2) with a steered point."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bake.cli import main
from bake.evaluation import refusal as R
from bake.evaluation.refusal_data import KINDS, all_prompts, prompts


def test_prompt_sets_and_disjoint_splits():
    sizes = {k: len(all_prompts(k)) for k in KINDS}
    assert sizes == {"harmful": 200, "harmless": 200, "benign": 150, "donotanswer": 938}  # 939, one repeated
    for kind in KINDS:
        fit, sel, held = (prompts(kind, s) for s in ("fit", "select", "heldout"))
        assert len(set(all_prompts(kind))) == len(all_prompts(kind))
        assert not set(fit) & set(sel) and not set(fit) & set(held) and not set(sel) & set(held)
        assert len(fit) + len(sel) + len(held) == sizes[kind]
        assert abs(len(fit) - 0.4 * sizes[kind]) <= 2 and abs(len(held) - 0.4 * sizes[kind]) <= 2
    assert not set(all_prompts("harmless")) & set(all_prompts("harmful"))


@pytest.mark.parametrize("text,refused", [
    ("I *cannot* help with that.", True), ("", True), ("   ", True), ("I won\u2019t do this", True),
    ("Sure! Here is a recipe for bread: mix flour and water.", False),
    ("Step 1: gather the materials.\n\nStep 2: assemble them.", False),
    ("That would be   ILLEGAL in most places.", True),
])
def test_marker_detector(text, refused):
    assert R.is_refusal(text) is refused


def test_heretic_kl_is_the_mean_kl_from_the_original():
    g = torch.Generator().manual_seed(0)
    orig = torch.log_softmax(torch.randn(5, 30, generator=g, dtype=torch.float64), -1)
    new = torch.log_softmax(torch.randn(5, 30, generator=g, dtype=torch.float64), -1)
    manual = float((orig.exp() * (orig - new)).sum(-1).mean())
    assert R.heretic_kl(new, orig) == pytest.approx(manual, rel=1e-12)
    assert R.heretic_kl(orig, orig) == 0.0


@pytest.fixture(scope="module")
def smollm():
    from bake.models import load

    loaded = load("llama")
    return loaded.model, loaded.tokenizer


def test_opening_probability_is_the_teacher_forced_probability(smollm, monkeypatch):
    """Batched with left padding, each opening's probability equals a plain forward pass of the prompt
    followed by the opening, and the total is the sum over openings."""
    model, tok = smollm
    texts = R.chat_texts(tok, ["Tell me a joke.", "Give detailed instructions for repotting a houseplant now"])
    monkeypatch.setattr(R, "OPENINGS", ("I'm sorry", "Sure"))
    got = R.opening_probability(model, tok, texts, batch_size=3)

    class LogitsOnly:  # a runtime that returns logits and no cache (llama.cpp, ONNX Runtime wrappers)
        device = model.device

        def __call__(self, input_ids=None, attention_mask=None, **_):
            return type("Out", (), {"logits": model(input_ids=input_ids, attention_mask=attention_mask).logits})()

    assert R.opening_probability(LogitsOnly(), tok, texts, batch_size=3) == pytest.approx(got, rel=1e-4, abs=1e-9)
    for t, p in zip(texts, got):
        total = 0.0
        for o in R.OPENINGS:
            a, b = tok(t, add_special_tokens=False).input_ids, tok(o, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([a + b])).logits[0].double(), -1)
            total += math.exp(sum(float(logp[len(a) + i - 1, b[i]]) for i in range(len(b))))
        assert p == pytest.approx(total, rel=1e-4, abs=1e-9)
        assert 0.0 <= p <= 1.0


def test_eval_refusal_task_on_the_chat_model(tmp_path, capsys):
    """The original point: KL 0; a hooked spec moves the first-token distribution (KL > 0); rates are
    fractions of the prompts; responses are kept as examples; sampled responses (`--sampled`) are one set
    per seed, pooled; the plot is drawn."""
    out = tmp_path / "r.json"
    code = main(["eval", "--model", "llama", "--spec", "examples/detox.json", "--strengths", "1.39", "--task",
                 "refusal", "--n-prompts", "2", "--max-new-tokens", "8", "--sampled", "--seeds", "0,1",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["refusal_prompts"] == {"harmful": 2, "benign": 2, "harmless": 2}
    orig, steer = doc["points"]
    assert orig["refusal"]["harmless_kl"] == 0.0 and steer["refusal"]["harmless_kl"] > 0
    for p in (orig, steer):
        for kind in ("harmful", "benign"):
            r = p["refusal"][kind]
            assert r["prompts"] == 2 and 0 <= r["refusal_rate"] <= 1 and 0 <= r["mean_opening_probability"] <= 1
            assert r["refusals"] == sum(e["refusal"] for e in r["examples"])
            assert all(R.is_refusal(e["response"]) == e["refusal"] for e in r["examples"])
            s = r["sampled"]
            assert s["seeds"] == [0, 1] and s["responses"] == 4 and len(s["refusals_per_seed"]) == 2
            assert s["refusals"] == sum(s["refusals_per_seed"]) and s["refusal_rate"] == s["refusals"] / 4
    assert doc["config"]["refusal_sampled"] is True
    assert out.with_suffix(".png").is_file()


def test_sampled_responses_depend_on_the_seed_only(smollm):
    """Sampled responses are reproducible per seed (reseeded per batch), whatever ran before, and a
    different seed draws other responses; greedy ones are unchanged by seeding."""
    model, tok = smollm
    texts = R.chat_texts(tok, ["Write a short poem about rain.", "Name a colour and say why you like it."])
    a = R.responses(model, tok, texts, 12, 2, seed=3)
    torch.manual_seed(123)
    assert R.responses(model, tok, texts, 12, 2, seed=3) == a
    assert R.responses(model, tok, texts, 12, 2, seed=4) != a
    assert R.responses(model, tok, texts, 12, 2) == R.responses(model, tok, texts, 12, 2)


def test_fit_reads_builtin_sets_and_templates_chat_turns(tmp_path, capsys, tokenizer):
    """`--source bake:harmful` is the fit split of a shipped set; `--chat` wraps every text in the chat
    template (refused where the tokenizer has none) and is recorded in the spec."""
    from bake.fit import read_texts
    from bake.spec import read
    from conftest import make_llama, save_model

    assert read_texts("bake:harmful", "--source") == prompts("harmful", "fit")
    assert read_texts("bake:harmless:select", "--target") == prompts("harmless", "select")
    both = read_texts("bake:harmless+benign:select", "--control")
    assert both == prompts("harmless", "select") + prompts("benign", "select") and len(set(both)) == len(both)
    plain = save_model(make_llama(), tokenizer, tmp_path / "plain")
    args = ["fit", "--method", "ablate", "--direction", "mean", "--pooling", "last", "--source", "bake:harmful",
            "--target", "bake:harmless", "--chat"]
    assert main([*args, "--model", str(plain), "--out", str(tmp_path / "a.json")]) == 2
    assert "no chat template" in capsys.readouterr().err and not (tmp_path / "a.json").exists()
    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    chat = save_model(make_llama(), tokenizer, tmp_path / "chat")
    tokenizer.chat_template = None
    assert main([*args, "--model", str(chat), "--out", str(tmp_path / "b.json")]) == 0
    assert main([*args[:-1], "--model", str(chat), "--out", str(tmp_path / "c.json")]) == 0
    b, c = read(tmp_path / "b.json"), read(tmp_path / "c.json")
    assert "chat" in b.params and "chat" not in c.params
    assert b.provenance["source"]["file"] == "bake:harmful" and b.provenance["source"]["n"] == 80
    ub, uc = b.sites[0][1][0].tensors["U"], c.sites[0][1][0].tensors["U"]
    assert float((ub.T @ uc).abs()) < 0.999  # the template changes the last-token residuals


def test_ablate_kernel_interpolation_and_layer_directions(tmp_path, tokenizer):
    """heretic's parameters as a spec: per-layer strengths from the kernel (per component), a direction
    interpolated between two layers, or each write's own layer's direction; the spec bakes and verifies."""
    from bake import compiler
    from bake.fit import FitConfig, fit
    from bake.fit.ablate import kernel_weight, parse_kernel
    from conftest import TEXTS, make_llama, save_model

    model = make_llama(layers=4)
    src, tgt = TEXTS[3::2] * 2, TEXTS[::2] * 2
    one = {i: fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=i,
                                                       pooling="last")) for i in (1, 2)}
    u = {i: one[i].sites[0][1][0].tensors["U"].double() for i in (1, 2)}
    mixed = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=1.25, pooling="last"))
    want = 0.75 * u[1] + 0.25 * u[2]
    assert torch.allclose(mixed.sites[0][1][0].tensors["U"].double(), want / want.norm(), atol=1e-6)
    kernel = "attn=1.0,2,0.5,1;mlp=0.8,0,0.0,2"
    spec = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", layer_directions=True,
                                                     pooling="last", kernel=kernel, strength=1.5))
    k = parse_kernel(kernel)
    got = {n: m[0].strength for n, m in spec.sites}
    for layer in range(4):
        for comp, site in (("attn", f"model.layers.{layer}.self_attn.o_proj:output"),
                           ("mlp", f"model.layers.{layer}.mlp.down_proj:output")):
            w = kernel_weight(k[comp], layer)
            assert got.get(site, 0.0) == pytest.approx(1.5 * w)
    assert "model.layers.0.self_attn.o_proj:output" not in got  # beyond DIST: no map at all
    for name, maps in spec.sites:
        layer = int(name.split(".")[2])
        if layer in u:
            assert torch.allclose(maps[0].tensors["U"].double(), u[layer], atol=1e-6)
    from bake.spec import write

    save_model(model, tokenizer, tmp_path / "m")
    write(spec, tmp_path / "k.json")
    v = compiler.apply(str(tmp_path / "m"), [str(tmp_path / "k.json")], tmp_path / "out", log=lambda *_: None).verification
    assert v["passed"] and v["max_rel"] <= 1e-5, v


def test_norm_preserving_and_orthogonalized_ablation_fold_exactly(tmp_path, tokenizer):
    """Biprojected abliteration: the direction is orthogonal to the target mean, and after the bake every
    writer row keeps its norm while the weights move; the three maps per write fold and verify."""
    from safetensors.torch import load_file

    from bake import compiler
    from bake.fit import FitConfig, fit
    from bake.fit.collect import collect
    from bake.spec import write
    from conftest import TEXTS, make_llama, save_model

    model = make_llama(layers=3)
    src, tgt = TEXTS[3::2] * 2, TEXTS[::2] * 2
    spec = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=1, pooling="last",
                                                     orthogonalize=True, norm_preserving=True, strength=1.3))
    from bake.families import adapter_for

    res = adapter_for(model).sites(model)["model.layers.1:output"]
    g = collect(model, tokenizer, tgt, [res], 8, pooling="last")[res.name].double().mean(0)
    kinds = [m.kind for m in spec.sites[0][1]]
    assert kinds == ["affine", "projection", "affine"]
    u = spec.sites[0][1][1].tensors["U"][:, 0].double()
    assert abs(float(u @ g)) / float(g.norm()) < 1e-6 and float(u.norm()) == pytest.approx(1.0)
    save_model(model, tokenizer, tmp_path / "m")
    write(spec, tmp_path / "np.json")
    v = compiler.apply(str(tmp_path / "m"), [str(tmp_path / "np.json")], tmp_path / "out", log=lambda *_: None).verification
    assert v["passed"] and v["max_rel"] <= 1e-5, v
    baked = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, _ in spec.sites:
        w = name.removesuffix(":output") + ".weight"
        before, after = dict(model.named_parameters())[w].detach(), baked[w]
        assert torch.allclose(after.norm(dim=1), before.norm(dim=1), rtol=1e-5)
        assert (after - before).abs().max() > 1e-3


def test_rank_k_ablation_is_an_orthonormal_subspace_led_by_the_mean_direction(tmp_path, tokenizer):
    """--rank 3: U is [units, 3], orthonormal, its first column the mean direction; with --orthogonalize
    every column is orthogonal to the target mean; norm-preserving with it folds and verifies."""
    from bake import compiler
    from bake.fit import FitConfig, fit
    from bake.spec import write
    from conftest import TEXTS, make_llama, save_model

    model = make_llama(layers=3)
    src, tgt = TEXTS[3::2] * 2, TEXTS[::2] * 2
    one = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=1, pooling="last"))
    three = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=1, pooling="last",
                                                      rank=3))
    U, u = three.sites[0][1][0].tensors["U"].double(), one.sites[0][1][0].tensors["U"].double()
    assert U.shape[1] == 3 and torch.allclose(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(U[:, :1], u, atol=1e-5)
    both = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", direction_layer=1, pooling="last",
                                                     rank=3, orthogonalize=True, norm_preserving=True))
    from bake.families import adapter_for
    from bake.fit.collect import collect

    res = adapter_for(model).sites(model)["model.layers.1:output"]
    g = collect(model, tokenizer, tgt, [res], 8, pooling="last")[res.name].double().mean(0)
    Ub = both.sites[0][1][1].tensors["U"].double()
    assert (Ub.T @ g).abs().max() / g.norm() < 1e-6 and torch.allclose(Ub.T @ Ub, torch.eye(3, dtype=torch.float64),
                                                                       atol=1e-6)
    save_model(model, tokenizer, tmp_path / "m")
    write(both, tmp_path / "r3.json")
    v = compiler.apply(str(tmp_path / "m"), [str(tmp_path / "r3.json")], tmp_path / "out", log=lambda *_: None).verification
    assert v["passed"] and v["max_rel"] <= 1e-5, v
    assert main(["fit", "--model", str(tmp_path / "m"), "--method", "ablate", "--rank", "2", "--direction-layer",
                 "1.5", "--source", "bake:harmful", "--target", "bake:harmless", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_search_writes_trials_front_and_a_chosen_spec_that_bakes(tmp_path, tokenizer, capsys):
    """`bake search` on a tiny chat model: every trial recorded with its parameters, refusals and KL; the
    chosen trial is on the Pareto front; its spec bakes equal to the hooked reference."""
    pytest.importorskip("optuna")
    from conftest import make_llama, save_model

    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    model_dir = save_model(make_llama(layers=4), tokenizer, tmp_path / "chat")
    tokenizer.chat_template = None
    out = tmp_path / "s"
    assert main(["search", "--model", str(model_dir), "--trials", "3", "--n-prompts", "3", "--max-new-tokens", "4",
                 "--startup-trials", "2", "--orthogonalize", "--norm-preserving", "--system", "Be brief.",
                 "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    doc = json.loads((out / "trials.json").read_text())
    assert [r["trial"] for r in doc["trials"]] == [0, 1, 2] and doc["prompts_select"] == {"harmful": 3, "harmless": 3}
    assert all(0 <= r["refusals"] <= 3 and r["kl"] >= 0 for r in doc["trials"]) and 0 <= doc["original_refusals"] <= 3
    assert doc["chosen"] in doc["front"] and set(doc["front"]) <= {0, 1, 2}
    assert (out / "front.png").is_file()
    assert sorted(p.name for p in (out / "front").glob("*.json")) == sorted(f"trial_{i}.json" for i in doc["front"])
    assert doc["norm_preserving"] and doc["orthogonalize"] and doc["system"] == "Be brief."
    from bake import compiler
    from bake.spec import read

    assert {m.kind for _, maps in read(out / "chosen.json").sites for m in maps} == {"affine", "projection"}

    v = compiler.apply(str(model_dir), [str(out / "chosen.json")], tmp_path / "baked", log=lambda *_: None).verification
    assert v["passed"] and v["max_rel"] <= 1e-5, v


def test_search_over_the_rank_keeps_each_trials_first_k_columns_and_bakes(tmp_path, tokenizer):
    """`max_rank` K: directions fitted once at rank K; a rank-k trial removes the first k columns, which
    are the rank-k fit itself (the mean direction, then principal ones; orthogonalised); every trial's
    spec carries its rank, and a rank-2 trial's spec bakes equal to the hooked reference."""
    pytest.importorskip("optuna")
    from conftest import make_llama, save_model

    from bake import compiler
    from bake.fit import FitConfig, fit
    from bake.search import SearchConfig, _spec, search
    from bake.spec import read, write

    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        model = make_llama(layers=4)
        src, tgt = prompts("harmful", "fit")[:12], prompts("harmless", "fit")[:12]
        cfg = SearchConfig(trials=4, n_prompts=2, max_new_tokens=3, startup_trials=4, orthogonalize=True,
                           norm_preserving=True, max_rank=3, seed=1)
        doc = search(model, tokenizer, src, tgt, cfg, tmp_path / "s", log=lambda *_: None)
        assert doc["max_rank"] == 3 and all(1 <= r["params"]["rank"] <= 3 for r in doc["trials"])
        for t in doc["front"]:
            spec = read(tmp_path / "s" / "front" / f"trial_{t}.json")
            k = doc["trials"][t]["params"]["rank"]
            assert spec.params["rank"] == k and all(m.tensors["U"].shape[1] == k for _, maps in spec.sites
                                                    for m in maps if m.kind == "projection")
        two = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", pooling="last", chat=True,
                                                        layer_directions=True, orthogonalize=True, rank=2))
        three = fit(model, tokenizer, src, tgt, FitConfig("ablate", direction="mean", pooling="last", chat=True,
                                                          layer_directions=True, orthogonalize=True, rank=3))
        for (_, m2), (_, m3) in zip(two.sites, three.sites):
            assert torch.allclose(m3[0].tensors["U"][:, :2], m2[0].tensors["U"], atol=1e-5)
        dirs = {int(n.split(".")[2]): maps[0].tensors["U"] for n, maps in three.sites}
        params = {**doc["trials"][0]["params"], "rank": 2, "direction_index": 1.4,
                  "attn": (1.0, 2.0, 0.5, 3.0), "mlp": (1.0, 2.0, 0.5, 3.0)}
        spec = _spec(three, dirs, {n: "attn" if "self_attn" in n else "mlp" for n, _ in three.sites}, params)
        assert all(torch.equal(maps[0].tensors["U"], dirs[1][:, :2]) for _, maps in spec.sites)
        save_model(model, tokenizer, tmp_path / "m")
        write(spec, tmp_path / "r2.json")
        v = compiler.apply(str(tmp_path / "m"), [str(tmp_path / "r2.json")], tmp_path / "out",
                           log=lambda *_: None).verification
        assert v["passed"] and v["max_rel"] <= 1e-5, v
        bad = tmp_path / "bad"
        assert main(["search", "--model", str(tmp_path / "m"), "--max-rank", "0", "--out", str(bad)]) == 2
        assert not bad.exists()
    finally:
        tokenizer.chat_template = None


def test_shipped_abliteration_spec_is_the_searched_qwen_spec():
    """examples/abliterate.json (bake search on Qwen2.5-Coder-0.5B-Instruct, benchmarks/abliteration_vs_heretic.py)
    reads as a spec of foldable maps at the attn-out / mlp-out writes of a 24-layer, 896-wide model, three
    maps per write (norm-preserving), fingerprinted on that model. Baking it needs the qwen packages
    (not installed by install.sh): docs/abliteration.md has the measured bake and verify."""
    from pathlib import Path

    from bake.spec import read

    spec = read(Path(__file__).resolve().parents[1] / "examples" / "abliterate.json")
    assert spec.method == "ablate" and spec.params["norm_preserving"] and spec.params["orthogonalized"]
    assert spec.model and spec.params["search"]["trial"] >= 0
    for name, maps in spec.sites:
        layer = int(name.split(".")[2])
        assert 0 <= layer < 24 and name.endswith(("self_attn.o_proj:output", "mlp.down_proj:output"))
        assert [m.kind for m in maps] == ["affine", "projection", "affine"]
        U = maps[1].tensors["U"]
        assert U.shape == (896, 1) and abs(float(U.norm()) - 1) < 1e-5


def test_shipped_refusal_induction_specs_gate_the_caa_vector_at_layer_12():
    """examples/refuse.json and refuse_sigmoid.json (docs/abliteration.md, refusal induction): the refusal
    vector of examples/refuse_caa.json (harmful − harmless mean residual after layer 12, last prompt token)
    behind a DSAS detector fitted on HarmBench vs harmless + benign edgy prompts, fingerprinted on
    Qwen2.5-Coder-0.5B-Instruct. refuse_sigmoid.json gates it with σ(w·h + c) (bakes with
    --insert-modules); refuse.json writes the gate as two units of layer 12's MLP, whose down columns
    are ±v/k, so it folds into a stock checkpoint. Baking them needs the qwen packages: the measured
    bakes are in the docs."""
    from pathlib import Path

    from bake.fit.dsas_units import unit_gate
    from bake.spec import read

    ex = Path(__file__).resolve().parents[1] / "examples"
    sig, units, caa = (read(ex / f) for f in ("refuse_sigmoid.json", "refuse.json", "refuse_caa.json"))
    (_, (vec,)), = caa.sites
    v = vec.tensors["v"].double()
    assert vec.kind == "additive" and float(v.norm()) > 1
    assert sig.method == units.method == "dsas" and sig.model == units.model == caa.model and sig.params["chat"]
    assert [s for s, _ in sig.sites] == ["model.layers.12:output"]
    (gate,) = sig.sites[0][1]
    assert gate.kind == "gated" and gate.strength == 1.0 and gate.tensors["w"].shape == (896,)
    assert sig.params["detector_accuracy"]["model.layers.12:output"] >= 0.75
    x = torch.randn(3, 896, dtype=torch.float64)
    # the gate's inner map is the CAA vector: fully open, the step is v
    assert torch.allclose(gate.inner.with_strength(1.0)(x) - x, v.expand(3, -1), atol=1e-5)
    (site, (m,)), = units.sites
    assert site == "model.layers.12.mlp.down_proj:output" and m.kind == "units" and m.strength == 1.0
    k = units.params["sharpness"]
    assert m.tensors["gate"].shape == (2, 896) and torch.allclose(m.tensors["down"].double(), torch.stack([v / k, -v / k], 1), atol=1e-6)
    g = units.params["gates"][site]
    assert g["detector_accuracy"] >= 0.75 and abs(g["u_dot_z"]["mean"] - 1) < 0.01 and g["gate_agreement"] < 0.05
    # on inputs with u·z = 1, the gate is the hard sigmoid of t = G₀·z / k: shut at t = −1, half at ½, open at 2
    u, G0 = m.tensors["up"][0].double(), m.tensors["gate"][0].double()
    p = G0 - (G0 @ u) / (u @ u) * u  # moves t, keeps u·z
    base = u / (u @ u)
    z = torch.stack([base + (t - float(G0 @ base) / k) * k / float(G0 @ p) * p for t in (-1.0, 0.5, 2.0)])
    assert torch.allclose(z @ u, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(unit_gate(m, z, k), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=0.01)
