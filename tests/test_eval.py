"""bake eval: sweep over strengths, resumable JSON, plot, baked == hooked numbers, bad input."""

from __future__ import annotations

import json

import pytest

from bake import compiler
from bake.cli import main
from bake.evaluation import EvalConfig, flores, rtp_prompts
from bake.evaluation.sweep import run
from bake.fit import FitConfig, fit
from bake.spec import read, write
from conftest import TEXTS, make_llama, save_model


def test_vendored_data_splits():
    tune, held, every = rtp_prompts("tune"), rtp_prompts("heldout"), rtp_prompts("all")
    assert not set(tune) & set(held)  # some prefixes sit in two files: never in both splits
    assert len(set(every)) == len(every) == len(tune) + len(held)
    assert 150 <= len(tune) <= 160 and 200 <= len(held) <= 240
    ft, fh = flores(200, "tune"), flores(200, "heldout")
    assert len(ft) == len(fh) == 200 and not set(ft) & set(fh)  # λ is chosen on one half, reported on the other
    assert len(flores(500, "tune")) == 500


def test_perplexity_batching_does_not_change_it(tokenizer):
    from bake.evaluation.tasks import perplexity

    model = make_llama(seed=5)
    sents = flores(12, "tune")
    vals = [perplexity(model, tokenizer, EvalConfig(tasks=["perplexity"], prompts=[], sentences=sents,
                                                   batch_size=b))["perplexity"] for b in (1, 5, 12)]
    assert vals[0] > 1 and max(vals) / min(vals) - 1 < 1e-5, vals


def test_scorers_rank_offensive_text_above_benign_text():
    from bake.evaluation.scorers import load_scorers

    texts = ["you are a stupid fucking idiot", "I walked the dog in the park this morning and it was lovely"]
    scorers = load_scorers("profanity,hatesonar")
    assert list(scorers) == ["profanity", "hatesonar"]  # the order given: the first is the headline one
    for name, score in scorers.items():
        bad, good = score(texts)
        assert 0.0 <= good < 0.5 < bad <= 1.0, (name, bad, good)
        assert score([]) == []


@pytest.fixture()
def setup(tmp_path, tokenizer):
    model = make_llama(seed=21)
    src = save_model(model, tokenizer, tmp_path / "model")
    spec = fit(model, tokenizer, TEXTS[1::2], TEXTS[0::2], FitConfig("mean-act", ["post-norms"], strength=1.0))
    write(spec, tmp_path / "s.json")
    compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "baked", run_verify=False, log=lambda *_: None)
    cfg = EvalConfig(tasks=["toxicity", "perplexity"], prompts=TEXTS[:5], sentences=TEXTS[5:9], seeds=[0, 1],
                     max_new_tokens=6, batch_size=3)
    return tmp_path, src, cfg


def test_sweep_resumes_and_baked_matches_hooked(setup):
    tmp, src, cfg = setup
    out = tmp / "eval.json"
    specs = [read(tmp / "s.json")]
    doc = run(str(src), cfg, out, specs, [0.5, 1.0], str(tmp / "baked"), tmp / "eval.png", log=lambda *_: None)
    labels = [p["label"] for p in doc["points"]]
    assert labels == ["original", "λ=0.5", "λ=1", "baked"]
    pts = {p["label"]: p for p in doc["points"]}
    for p in doc["points"]:
        t = p["toxicity"]
        assert t["continuations"] == 10 and 0 <= t["toxic_rate"] <= 1 and t["gen_tokens_per_s"] > 0
        assert p["perplexity"]["perplexity"] > 1
    # a baked checkpoint gives the numbers of the hooked spec at its strength
    assert pts["baked"]["toxicity"]["examples"] == pts["λ=1"]["toxicity"]["examples"]
    assert abs(pts["baked"]["perplexity"]["perplexity"] / pts["λ=1"]["perplexity"]["perplexity"] - 1) < 1e-5
    assert pts["original"]["perplexity"]["perplexity"] != pts["λ=1"]["perplexity"]["perplexity"]
    assert (tmp / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "joblib.load" in doc["scorer_loads_pickle"]["profanity"]  # the report says the scorer unpickles
    # resume: a rerun with one more strength computes only that point
    seen = []
    doc2 = run(str(src), cfg, out, specs, [0.5, 1.0, 1.5], str(tmp / "baked"), None, log=seen.append)
    assert any("resuming" in s for s in seen) and sum("λ=" in s or "original" in s or "baked" in s
                                                     for s in seen if "resuming" not in s) == 1
    assert [p["label"] for p in doc2["points"]] == ["original", "λ=0.5", "λ=1", "λ=1.5", "baked"]
    assert doc2["points"][0] == doc["points"][0]


def test_eval_cli_and_bad_input(setup, capsys):
    tmp, src, _ = setup
    (tmp / "p.txt").write_text("\n".join(TEXTS[:3]))
    base = ["eval", "--model", str(src), "--out", str(tmp / "e.json")]
    code = main(base + ["--task", "perplexity", "--n-sentences", "3", "--spec", str(tmp / "s.json"),
                        "--strengths", "1"])
    assert code == 0
    doc = json.loads((tmp / "e.json").read_text())
    assert [p["label"] for p in doc["points"]] == ["original", "λ=1"] and (tmp / "e.png").is_file()
    assert doc["device"] == "cpu"
    ppl_flores = doc["points"][0]["perplexity"]
    code = main(["eval", "--model", str(src), "--out", str(tmp / "own.json"), "--task", "perplexity",
                 "--sentences", str(tmp / "p.txt"), "--strengths", "1", "--spec", str(tmp / "s.json")])
    own = json.loads((tmp / "own.json").read_text())["points"][0]["perplexity"]
    assert code == 0 and own["tokens"] != ppl_flores["tokens"]  # the user's texts, not FLORES
    from bake.evaluation.tasks import perplexity
    from bake.models import load

    loaded = load(str(src))
    cfg = EvalConfig(tasks=["perplexity"], prompts=[], sentences=TEXTS[:3])
    assert own["perplexity"] == pytest.approx(perplexity(loaded.model, loaded.tokenizer, cfg)["perplexity"], rel=1e-6)
    capsys.readouterr()
    for extra, msg in [(["--task", "fun"], "--task"), (["--strengths", "a,b"], "--strengths"),
                       (["--strengths", "nan"], "--strengths"), (["--seeds", "1.5"], "--seeds"),
                       (["--split", "secret"], "--split"), (["--n-sentences", "0"], "--n-sentences"),
                       (["--baked", str(tmp)], "--baked"), (["--scorer", "vibes"], "--scorer"),
                       (["--scorer", ","], "--scorer"), (["--device", "tpu"], "--device"),
                       (["--prompts", str(tmp / "none.txt")], "--prompts"),
                       (["--sentences", str(tmp / "none.txt")], "--sentences"),
                       (["--sentences", str(tmp / "p.txt"), "--n-sentences", "0"], "--n-sentences")]:
        code = main(["eval", "--model", str(src), "--out", str(tmp / "bad.json")] + extra)
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (extra, err)
    assert not (tmp / "bad.json").exists()


def test_cuda_asked_without_a_gpu_is_a_clear_error(setup, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    tmp, src, _ = setup
    for cmd in (["eval", "--model", str(src), "--out", str(tmp / "g.json")],
                ["fit", "--model", str(src), "--source", str(tmp / "p.txt"), "--target", str(tmp / "p.txt"),
                 "--method", "mean-act", "--out", str(tmp / "g.json")]):
        (tmp / "p.txt").write_text("\n".join(TEXTS[:3]))
        assert main(cmd + ["--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    assert not (tmp / "g.json").exists()


def test_missing_scorer_names_the_install(monkeypatch):
    import builtins

    from bake.errors import BakeError
    from bake.evaluation.scorers import load_scorer

    real = builtins.__import__

    def no_profanity(name, *a, **k):
        if name == "profanity_check":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_profanity)
    with pytest.raises(BakeError, match="pip install alt-profanity-check"):
        load_scorer("profanity")
