"""--format gguf from a transformers directory, through llama.cpp's own converter (issue 39): a random
foldable spec per architecture, baked, converted, and verified in llama.cpp against the hooked
reference (f32: relative logit error <= 1e-4, identical greedy continuations); what llama.cpp would run
differently is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bake.cli import main
from bake.maps import Map
from bake.spec import Spec, write
from conftest import make_family, save_model, stamp

pytest.importorskip("llama_cpp", reason="install.sh installs llama-cpp-python (builds llama.cpp)")
SHORT = ("--max-new-tokens", "8")


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's tokenizer (a pre-tokenizer llama.cpp's converter knows) with its 49,152-token vocabulary."""
    from transformers import AutoTokenizer

    from bake.models import resolve

    return AutoTokenizer.from_pretrained(str(resolve("llama")))


def _tiny(family: str, vocab: int, hidden: int = 64):
    """A 2-layer, `hidden`-wide random model of `family` over `vocab` tokens (norm weights and, where the family
    has them, q/k/v biases and q/k norms away from their defaults, so that their layouts are tested)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    extra = {"granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                             logits_scaling=4.0),
             "qwen3": dict(head_dim=16), "mistral": dict(sliding_window=None),
             "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
             "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=64, layer_types=None),
             }.get(family, {})
    if family == "gpt2":
        common = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                      eos_token_id=2)
    config, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                           "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
                           "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
                           "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM), "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
                           "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),
                           "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_class(config(**common, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def _saved(model, tok, path: Path) -> Path:
    """The model with SmolLM2's tokenizer, named by its concrete class: transformers 5 saves
    `TokenizersBackend`, which a Qwen2 directory would read as Qwen2's own tokenizer (another pre-tokenizer);
    for Phi-3 `GPT2Tokenizer`, the class for which llama.cpp's converter reads a BPE vocabulary (Phi-4's)
    instead of SentencePiece's tokenizer.model."""
    save_model(model, tok, path)
    doc = json.loads((path / "tokenizer_config.json").read_text())
    doc["tokenizer_class"] = "GPT2Tokenizer" if model.config.model_type == "phi3" else "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(doc))
    return path


def _random_spec(model, seed: int) -> Spec:
    """Projections at every attention and MLP write (random rank-1 U) and a per-unit scale at every MLP's
    hidden units: each folds into weights alone (no bias), so every architecture can hold it."""
    from bake.support_table import weights_only_spec

    return weights_only_spec(model, seed)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "qwen3_moe", "granite", "olmo2", "phi3", "gpt2",
                                    "gemma3_text"])  # qwen2: test_gguf.py (GGUF source)
def test_transformers_directory_to_gguf_f32_verified(family, smol_tokenizer, tmp_path, capsys):
    """Gemma-3's tanh GELU is an fp16 table in llama.cpp's CPU kernels (1e-3 relative by itself on this
    model): its GGUF is judged against the hooked reference run with that table (`verify_gguf.ggml_gelu`)."""
    model = _tiny(family, len(smol_tokenizer))
    src = _saved(model, smol_tokenizer, tmp_path / family)
    write(_random_spec(model, seed=len(family)), tmp_path / "s.json")
    code = main(["apply", *SHORT, "--model", str(src), "--spec", str(tmp_path / "s.json"), "--format", "gguf",
                 "--gguf-type", "f32", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "bake_report.json").read_text())
    g = report["verification"]["gguf"]
    assert g["passed"] and g["greedy_same"] == g["prompts"], g
    assert g.get("ggml_gelu_max_rel", g["max_rel"]) <= max(1e-4, 1.5 * g.get("unsteered_ggml_gelu_max_rel", 0)), g
    assert ("ggml_gelu_max_rel" in g) == (family == "gemma3_text"), g  # the exact check everywhere else
    assert "by llama.cpp's converter" in out and (tmp_path / "o" / "model-F32.gguf").is_file()


def test_quantized_from_a_directory_within_the_yardstick(smol_tokenizer, tmp_path, capsys):
    """q8_0: written by the converter itself, judged against the unsteered model converted the same way."""
    model = _tiny("qwen3", len(smol_tokenizer))
    src = _saved(model, smol_tokenizer, tmp_path / "q3")
    write(_random_spec(model, seed=3), tmp_path / "s.json")
    code = main(["apply", *SHORT, "--model", str(src), "--spec", str(tmp_path / "s.json"), "--format", "gguf",
                 "--gguf-type", "q8_0", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    g = json.loads((tmp_path / "o" / "bake_report.json").read_text())["verification"]["gguf"]
    assert g["passed"] and g["gguf_type"] == "q8_0" and g["unsteered_max_abs"] > 0, g
    import gguf  # the types the report names are the file's (issue 38, item 12), and llama.cpp stayed quiet

    r = gguf.GGUFReader(str(tmp_path / "o" / "model-Q8_0.gguf"))
    assert g["tensor_types"]["Q8_0"] == sum(t.tensor_type.name == "Q8_0" for t in r.tensors) > 0, g
    from bake.exporters.gguf_header import read as header  # bake's fast header reader says what gguf-py says

    h = header(tmp_path / "o" / "model-Q8_0.gguf")
    assert h.tensors == [(t.name, t.tensor_type.name) for t in r.tensors]
    assert all(h.fields[k] == f.contents() if h.fields[k] is not None else f.types[0] == gguf.GGUFValueType.ARRAY
               for k, f in r.fields.items() if not k.startswith("GGUF.")) and h.fields["tokenizer.ggml.pre"]
    assert "llama_model_loader" not in out + err and "written as" in out


def test_unrecognised_pre_tokenizer_refused_before_work(tokenizer, tmp_path, capsys):
    """conftest's tiny trained tokenizer: the converter knows no hash of it, so llama.cpp would split text
    another way: exit 2, one line, nothing written."""
    model = make_family("llama")
    src = save_model(model, tokenizer, tmp_path / "m")
    write(_random_spec(model, seed=0), tmp_path / "s.json")
    code = main(["apply", "--model", str(src), "--spec", str(tmp_path / "s.json"), "--format", "gguf", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pre-tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,why", [({"architectures": ["FrobForCausalLM"]}, "does not know the architecture"),
                                        ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                                          "head_dim": 16, "query_pre_attn_scalar": 256}, "1/√head_dim"),
                                        ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                                          "num_experts": 4, "norm_topk_prob": False}, "renormalises")])
def test_what_llama_cpp_runs_differently_is_refused(change, why, tmp_path):
    from bake.errors import BakeError
    from bake.exporters import gguf_convert

    cfg = {"vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "model_type": "llama", "architectures": ["LlamaForCausalLM"], **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BakeError, match=why):
        gguf_convert.model_class(tmp_path)


def test_a_bias_the_architecture_lacks_is_named(smol_tokenizer, tmp_path, capsys):
    """A shift at the attention's output folds into o_proj's bias; Qwen3's class turns on every attention
    bias for it, and llama.cpp's qwen3 loader has slots for q/k/v biases but not o's (it would refuse the
    file: "wrong number of tensors"): exit 2 naming o_proj's bias alone, nothing written. The same spec on
    a Llama, whose loader reads every attention bias, verifies."""
    for family, ok in (("qwen3", False), ("llama", True)):
        model = _tiny(family, len(smol_tokenizer))
        src = _saved(model, smol_tokenizer, tmp_path / family)
        v = torch.randn(64, generator=torch.Generator().manual_seed(1))
        write(stamp(Spec([("model.layers.0.self_attn.o_proj:output", [Map("additive", 1.0, {"v": v})])]), model),
              tmp_path / f"{family}.json")
        code = main(["apply", *SHORT, "--model", str(src), "--spec", str(tmp_path / f"{family}.json"), "--format",
                     "gguf", "--gguf-type", "f32", "--out", str(tmp_path / f"o-{family}")])
        out, err = capsys.readouterr()
        if ok:
            assert code == 0 and "verify (gguf f32, llama.cpp): PASS" in out, err
        else:
            # layer 1's o_proj bias, a zero the flag turned on, is left out of the file (exact), not refused
            assert code == 2 and "qwen3 loader has no slot for model.layers.0.self_attn.o_proj.bias," in err, err
            assert not (tmp_path / f"o-{family}").exists()


def test_ggml_gelu_is_llama_cpps_table():
    """The emulation reads the fp16 grid: equal on fp16-representable inputs, the clamps at ±10, and
    within fp16 rounding of the exact tanh GELU."""
    from bake.verify_gguf import ggml_gelu

    x = torch.tensor([-12.0, -10.0, -1.5, 0.0, 0.5, 3.0, 10.0, 11.0])
    exact = torch.nn.functional.gelu(x, approximate="tanh")
    y = ggml_gelu(x)
    assert y[0] == 0 and y[1] == 0 and y[-1] == 11.0 and y[-2] == 10.0
    assert torch.allclose(y[2:6], exact[2:6], rtol=1e-3, atol=1e-3)
    z = torch.tensor([1.0001])
    assert ggml_gelu(z) == ggml_gelu(torch.tensor([1.0]))  # 1.0001 rounds to 1.0 in fp16


def _shift_spec(model, site: str, path: Path) -> Path:
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    u = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(2))
    sites = [(site, [Map("additive", 1.0, {"v": v})]),
             ("model.layers.0.self_attn.o_proj:output", [Map("projection", 0.8, {"U": u / u.norm()})])]
    write(stamp(Spec(sites), model), path)
    return path


def test_layer_output_shift_goes_to_the_control_vector_sidecar(smol_tokenizer, tmp_path, capsys):
    """Qwen3's class has no MLP bias, so a shift after layer 1 cannot fold: the refusal offers the sidecar;
    `--format gguf,control-vector` bakes the projection into the GGUF and puts the shift in
    control-vector.gguf, and llama.cpp runs the two together within 1e-4 of the hooked reference of the
    whole spec (re-checked by `bake verify`); the checkpoint is checked against the spec without the shift."""
    from bake.exporters.control_vector import read, sidecar

    model = _tiny("qwen3", len(smol_tokenizer))
    src = _saved(model, smol_tokenizer, tmp_path / "q3")
    spec = _shift_spec(model, "model.layers.1:output", tmp_path / "s.json")
    args = ["apply", *SHORT, "--model", str(src), "--spec", str(spec), "--gguf-type", "f32"]
    assert main([*args, "--format", "gguf", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj" in err and "--format gguf,control-vector" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()
    out_dir = tmp_path / "o"
    assert main([*args, "--format", "gguf,control-vector", "--out", str(out_dir)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    v = json.loads((out_dir / "bake_report.json").read_text())["verification"]
    assert v["passed"] and v["max_rel"] <= 1e-5 and "layer-output shifts" in v["without"], v
    g = v["gguf"]
    assert g["passed"] and g["max_rel"] <= 1e-4 and g["greedy_same"] == g["prompts"] and "sidecar" in g["control_vector"]
    assert "gguf f32 + control-vector sidecar, llama.cpp): PASS" in out
    dirs = read(out_dir / "control-vector.gguf")
    from bake.spec import read as read_spec

    want = read_spec(spec).sites[0][1][0].tensors["v"].numpy()  # the direction is the spec's v at strength 1
    assert list(dirs) == [1] and float(abs(dirs[1] - want).max()) == 0.0
    assert sidecar(out_dir / "model-F32.gguf") == out_dir / "control-vector.gguf"
    assert main(["verify", *SHORT, "--model", str(src), "--spec", str(spec), "--baked", str(out_dir)]) == 0
    again = capsys.readouterr().out
    assert "verify: PASS" in again and "control-vector sidecar, llama.cpp): PASS" in again, again


def test_bias_slots_table_is_llama_cpps():
    """`bake families` prints bake/data/gguf_slots.json: re-asked of llama.cpp here for Qwen3 (q/k/v slots,
    none for o_proj and the MLP), it must say the same."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gguf_slots", Path(__file__).parents[1] / "benchmarks" / "gguf_slots.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    from transformers import AutoTokenizer

    from bake.models import resolve

    shipped = json.loads(sweep.OUT.read_text())["types"]
    tok = AutoTokenizer.from_pretrained(str(resolve("llama")))
    assert sweep.probe("qwen3", tok) == shipped["qwen3"]  # an architecture with slots and without
    assert "self_attn.o_proj" in shipped["qwen3"]["no_slot"] and not shipped["llama"]["no_slot"]


def test_iq_type_with_an_importance_matrix(smol_tokenizer, tmp_path, capsys):
    """IQ2_XXS needs an importance matrix: refused without one, before any work. With `--imatrix texts`
    bake measures E[x²] at every matrix's input on the steered model, llama.cpp's quantizer uses it (the
    written file holds IQ2_XXS tensors: 256-wide rows), it is kept as imatrix.gguf, and the unsteered
    yardstick is quantized with it too."""
    import gguf

    from bake.exporters.gguf_imatrix import read_gguf

    model = _tiny("llama", len(smol_tokenizer), hidden=256)
    src = _saved(model, smol_tokenizer, tmp_path / "m")
    write(_random_spec(model, seed=5), tmp_path / "s.json")
    texts = tmp_path / "calib.txt"
    texts.write_text("The sea is wide and deep.\nA short note about rivers and lakes.\nCounting: one, two, three.\n")
    args = ["apply", *SHORT, "--model", str(src), "--spec", str(tmp_path / "s.json"), "--format", "gguf",
            "--gguf-type", "iq2_xxs"]
    assert main([*args, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--imatrix" in err and "Traceback" not in err and not (tmp_path / "no").exists()
    assert main([*args, "--imatrix", str(texts), "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    g = json.loads((tmp_path / "o" / "bake_report.json").read_text())["verification"]["gguf"]
    assert g["passed"] and "imatrix.gguf" in g["imatrix"] and g["tensor_types"].get("IQ2_XXS", 0) > 0, g
    m = read_gguf(tmp_path / "o" / "imatrix.gguf")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "o" / "model-IQ2_XXS.gguf")).tensors}
    assert "blk.0.ffn_down.weight" in m and set(m) <= names
    # E[x²] at layer 0's q/k/v input: the steered model's input_layernorm output over the same tokens
    from transformers import AutoModelForCausalLM

    baked = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o")).eval()
    seen = []
    h = baked.model.layers[0].input_layernorm.register_forward_hook(lambda mod, i, o: seen.append(o[0].double()))
    with torch.no_grad():
        for line in texts.read_text().splitlines():
            baked(**smol_tokenizer(line, return_tensors="pt"))
    h.remove()
    want = torch.cat(seen).pow(2).mean(0).float().numpy()
    assert abs(m["blk.0.attn_q.weight"] - want).max() <= 1e-5 * float(want.max())


def test_streamed_checkpoint_to_gguf(smol_tokenizer, tmp_path, capsys):
    """`--stream --format gguf`: the sharded checkpoint is baked without loading it, and llama.cpp's
    converter reads the baked shards lazily; the shift's new down_proj bias (a slot llama.cpp's llama
    loader has) reaches the file, and llama.cpp runs it within 1e-4 of the hooked reference."""
    model = _tiny("llama", len(smol_tokenizer))
    src = tmp_path / "m"
    model.save_pretrained(str(src), max_shard_size="2MB")
    smol_tokenizer.save_pretrained(str(src))
    assert len(list(src.glob("*.safetensors"))) > 1
    spec = _shift_spec(model, "model.layers.1:output", tmp_path / "s.json")
    code = main(["apply", *SHORT, "--model", str(src), "--spec", str(spec), "--stream", "--format", "gguf",
                 "--gguf-type", "f32", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "streamed" in out and "by llama.cpp's converter" in out
    g = json.loads((tmp_path / "o" / "bake_report.json").read_text())["verification"]["gguf"]
    assert g["passed"] and g["max_rel"] <= 1e-4 and g["greedy_same"] == g["prompts"], g
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "o" / "model-F32.gguf")).tensors}
    assert "blk.1.ffn_down.bias" in names


def test_llama_cpp_lora_from_a_directory(smol_tokenizer, tmp_path, capsys):
    """--format lora from a transformers directory: the PEFT adapter, and its llama.cpp LoRA written by
    llama.cpp's own convert_lora_to_gguf.py (Llama's q/k rows permuted to llama.cpp's rotary layout by its
    converter class: a projection at q_proj's output tests it), verified in llama.cpp on the unsteered f32
    GGUF at scales 1 and 0."""
    family = "llama"
    from bake.families import adapter_for

    model = _tiny(family, len(smol_tokenizer))
    src = _saved(model, smol_tokenizer, tmp_path / family)
    g = torch.Generator().manual_seed(4)
    cat = adapter_for(model).sites(model)
    sites = []
    for name in ("model.layers.0.self_attn.q_proj:output", "model.layers.1.mlp.down_proj:output"):
        u = torch.randn(cat[name].units, 2, generator=g)
        sites.append((name, [Map("projection", 1.0, {"U": torch.linalg.qr(u)[0]})]))
    write(stamp(Spec(sites), model), tmp_path / "s.json")
    code = main(["apply", *SHORT, "--model", str(src), "--spec", str(tmp_path / "s.json"), "--format", "lora",
                 "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "by llama.cpp's LoRA converter" in out and (tmp_path / "o" / "lora" / "adapter-F32.gguf").is_file()
    v = json.loads((tmp_path / "o" / "bake_report.json").read_text())["verification"]
    lg = v["lora-gguf"]
    assert lg["passed"] and lg["max_rel"] <= 1e-4 and lg["scale0_max_rel"] <= 1e-4, lg


def _baked_from_gguf(family: str, kind: str, seed: int, tok, tmp_path, capsys, monkeypatch):
    """A tiny `family` model written as a `kind` GGUF by llama.cpp's converter, used as --model (bake's cache
    in tmp_path) with a weights-only random spec, --format gguf at the source's type: (source GGUF, stdout,
    the GGUF's verification report)."""
    from bake.exporters import gguf_convert
    from bake.models import load

    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    model = _tiny(family, len(tok))
    source = gguf_convert.convert(_saved(model, tok, tmp_path / "m"), tmp_path / "m.gguf", kind)
    write(_random_spec(load(str(source)).model, seed=seed), tmp_path / "s.json")
    code = main(["apply", *SHORT, "--model", str(source), "--spec", str(tmp_path / "s.json"), "--format", "gguf",
                 "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return source, out, json.loads((tmp_path / "o" / "bake_report.json").read_text())["verification"]["gguf"]


def test_gguf_source_of_an_architecture_bakes_own_writer_lacks(smol_tokenizer, tmp_path, capsys, monkeypatch):
    """A Gemma-3 GGUF as --model: converted once to a float32 directory (transformers' GGUF reader), baked,
    and written back by llama.cpp's converter in the source's type (f32 here), with the source's tokenizer
    metadata carried over key for key (it tokenizes as the source did), verified in llama.cpp."""
    from bake.exporters.gguf_header import read as header

    source, out, g = _baked_from_gguf("gemma3_text", "f32", 3, smol_tokenizer, tmp_path, capsys, monkeypatch)
    assert g["passed"] and g["gguf_type"] == "f32" and g["greedy_same"] == g["prompts"], g
    written, src = header(tmp_path / "o" / "model-F32.gguf").fields, header(source).fields
    assert written["general.architecture"] == "gemma3" and "by llama.cpp's converter" in out
    tok_keys = [k for k in src if k.startswith("tokenizer.")]
    assert tok_keys and all(written[k] == src[k] for k in tok_keys)
    assert sorted(k for k in written if k.startswith("tokenizer.")) == sorted(tok_keys)


def test_source_quantized_at_the_requested_type(smol_tokenizer, tmp_path, capsys, monkeypatch):
    """A q8_0 GGUF source baked back to q8_0 (its default): the unsteered weights sit on llama.cpp's q8_0 grid,
    so requantizing them costs little and the unsteered yardstick is biased low; verify also holds the baked
    checkpoint, converted again at f32, to the f32 rule in llama.cpp (and passes on it, with the steering's
    KL surviving, where the yardstick alone fails: the real Gemma-3-270M at q4_k_m, docs/gguf.md)."""
    _, _, g = _baked_from_gguf("llama", "q8_0", 8, smol_tokenizer, tmp_path, capsys, monkeypatch)
    assert g["gguf_type"] == "q8_0" and g["passed"], g
    f = g["f32_conversion"]  # run whenever the source is at the requested type; decides where the yardstick fails
    assert f["passed"] and f["max_rel"] <= 1e-4 and f["greedy_same"] == f["prompts"], f
    assert g["kl_quantized"] >= 0.5 * g["kl_float32"] > 0, g
