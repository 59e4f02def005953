"""`bake apply --format lora`: projection maps as LoRA deltas, so the runtime's LoRA scale is the
steering strength. PEFT's own loader runs the adapter: at scale s it equals the hooked reference at
strength λ·s (random projections of rank 1-3 at a Linear's output and at another's input); maps whose
weight delta is not low-rank are refused before anything is written."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bake.cli import main
from bake.families import adapter_for
from bake.maps import Map
from bake.runtime import steered
from bake.spec import Spec, write
from conftest import make_llama, save_model, stamp
from test_differential import random_map

peft = pytest.importorskip("peft", reason="install.sh installs peft (the dev extra)")


def projection_spec(model, patterns, seed: int = 3) -> Spec:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ad = adapter_for(model)
    cat = ad.sites(model)
    sites = [(n, [random_map("projection", cat[n].units, rng, gen)]) for n in ad.resolve(model, patterns)]
    return stamp(Spec(sites, method="random"), model)


def scaled(spec: Spec, s: float) -> Spec:
    return Spec([(n, [Map(m.kind, m.strength * s, m.tensors) for m in maps]) for n, maps in spec.sites],
                spec.method, model=spec.model)


@pytest.fixture(scope="module")
def lora_out(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("lora")
    model = make_llama(seed=4)
    src = save_model(model, tokenizer, tmp / "model")
    spec = projection_spec(model, ["attn-out", "mlp-in"])
    write(spec, tmp / "p.json")
    out = tmp / "out"
    assert main(["apply", "--model", str(src), "--spec", str(tmp / "p.json"), "--out", str(out),
                 "--format", "lora"]) == 0
    return model, spec, out


def test_lora_is_written_by_peft_and_verified_at_scale_one(lora_out):
    _, spec, out = lora_out
    conf = json.loads((out / "lora" / "adapter_config.json").read_text())
    ranks = {n: m[0].tensors["U"].shape[1] for n, m in spec.sites}
    assert conf["peft_type"] == "LORA" and conf["r"] == max(ranks.values())
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    # the llama.cpp LoRA is written only where it is verified, on a GGUF source's unsteered GGUF (issue 38, 5)
    assert not (out / "lora" / "adapter-F32.gguf").exists()
    v = json.loads((out / "bake_report.json").read_text())["verification"]
    assert v["passed"] and v["lora"]["passed"] and v["lora"]["max_rel"] <= 1e-5, v["lora"]


@pytest.mark.parametrize("s", [0.5, 1.0, 1.5])
def test_peft_scale_is_the_steering_strength(lora_out, s):
    from bake.artifacts import open_artifact
    from peft.tuners.lora import LoraLayer

    model, spec, out = lora_out
    art = open_artifact(out, "lora", flag="--baked")
    for mod in art.model.modules():
        if isinstance(mod, LoraLayer):
            mod.set_scale("default", s)  # scaling = s · α / r, and α = r
    ids = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = art.model(input_ids=ids).logits
        with steered(model, [scaled(spec, s)]):
            ref = model(ids).logits
        plain = model(ids).logits
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel
    assert float((plain - ref).abs().max()) > 1e3 * float((got - ref).abs().max())  # it really steers


def test_a_map_that_is_not_low_rank_is_refused_before_any_work(tmp_path, tokenizer, capsys):
    model = make_llama(seed=4)
    src = save_model(model, tokenizer, tmp_path / "model")
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    ad = adapter_for(model)
    name = ad.resolve(model, ["attn-out"])[0]
    spec = stamp(Spec([(name, [random_map("affine", 64, rng, gen)])], method="random"), model)
    write(spec, tmp_path / "a.json")
    code = main(["apply", "--model", str(src), "--spec", str(tmp_path / "a.json"), "--out", str(tmp_path / "o"),
                 "--format", "lora"])
    err = capsys.readouterr().err
    assert code == 2 and "--format lora" in err and name in err and "rank 64" in err, err
    assert not (tmp_path / "o").exists()
