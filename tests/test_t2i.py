"""Text-to-image pipelines (diffusers): random specs baked into small random pipelines (Stable
Diffusion UNet + CLIP, FLUX transformer + CLIP + T5, PixArt transformer + T5), reloaded with stock
DiffusionPipeline.from_pretrained, against the hooked pipeline with the same seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bake import compiler
from bake.cli import main
from bake.errors import BakeError
from bake.maps import Map
from bake.families.pipelines import PipelineAdapter
from bake.models.diffusion import load_pipeline, run_pipeline
from bake.models.tiny_pipelines import save_tiny_pipeline
from bake.runtime import steered
from bake.spec import Spec, write
from conftest import stamp

AD = PipelineAdapter()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sdxl", "flux", "pixart")}


def random_spec(root, patterns: list[str], seed: int, scale_only: tuple[str, ...] = ()) -> Spec:
    """Affine maps (scale + shift) at every site of the patterns; scale-only at sites under `scale_only`."""
    g = torch.Generator().manual_seed(seed)
    cat = AD.sites(root)
    sites = []
    for name in AD.resolve(root, patterns):
        u = cat[name].units
        b = torch.zeros(u) if name.startswith(scale_only) else 0.3 * torch.randn(u, generator=g)
        sites.append((name, [Map("affine", 0.5 + torch.rand((), generator=g).item(),
                                 {"a": 1 + 0.3 * torch.randn(u, generator=g), "b": b})]))
    return stamp(Spec(sites, method="random"), root)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = [  # (pipeline, site patterns, components whose T5 norms take scales only)
    ("sd", ["norms", "text-norms", "attn-out"], ()),
    ("sdxl", ["norms", "text-norms", "text_encoder_2.**.layers.0:output"], ()),
    ("flux", ["norms", "attn-out", "text_encoder.encoder.layers.*.layer_norm?:output",
              "text_encoder_2.encoder.block.*.layer.*.layer_norm:output"], ("text_encoder_2",)),
    ("pixart", ["norms", "transformer.transformer_blocks.*.ff.net.2:output",
                "text_encoder.encoder.block.*.layer.*.layer_norm:output"], ("text_encoder",)),
]


@pytest.mark.parametrize("kind,patterns,scale_only", CASES)
def test_pipeline_baked_equals_hooked(tmp_path, pipes, kind, patterns, scale_only):
    from diffusers import DiffusionPipeline

    src = pipes[kind]
    root = load_pipeline(src)
    spec = random_spec(root, patterns, seed=len(kind), scale_only=scale_only)
    if kind == "sdxl":  # the residual site takes an additive map (→ mlp.fc2 bias)
        i = next(i for i, (n, _) in enumerate(spec.sites) if n.endswith("layers.0:output"))
        spec.sites[i] = (spec.sites[i][0], [Map("additive", 1.0, {"v": 0.5 * torch.randn(32)})])
    write(spec, tmp_path / "s.json")
    formats = ["safetensors", "onnx"] if kind == "sdxl" else ["safetensors"]  # SDXL: added_cond_kwargs inputs
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=formats, log=lambda *_: None)
    v = res.verification
    assert v["passed"], v
    if kind == "sdxl":
        assert v["onnx_denoiser_rel"] <= 1e-4
    assert v["steered_vs_original_latent_rel"] > 1e-2  # the spec really steers
    # a stock loader, no hooks: the same latents as the hooked original with the same seed
    baked = DiffusionPipeline.from_pretrained(str(tmp_path / "out"), use_safetensors=True)
    from bake.models.diffusion import PipelineModel

    broot = PipelineModel(baked)
    prompts = ["a watercolor of a cat", "a red house at night"]
    with steered(root, spec):
        ref = run_pipeline(root, prompts, steps=3, seed=7)
    got = run_pipeline(broot, prompts, steps=3, seed=7)
    plain = run_pipeline(root, prompts, steps=3, seed=7)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 2e-5
    assert float((plain - ref).abs().max()) > 1e-3
    # untouched components are byte-identical copies; touched ones are the steered ones
    touched = {s.split(".", 1)[0] for s, _ in spec.sites}
    assert set(res.config_changes["components_rewritten"]) == touched
    before, after = digests(src), digests(tmp_path / "out")
    for f, h in before.items():
        comp = f.split("/", 1)[0]
        if comp not in touched and f != "README.md":
            assert after[f] == h, f
    report = json.loads((tmp_path / "out" / "bake_report.json").read_text())
    assert report["verification"]["passed"] and "diffusers" in (tmp_path / "out" / "README.md").read_text()


def test_pixart_norm_flag_is_turned_on(tmp_path, pipes):
    """PixArt builds its block norms without weights (norm_elementwise_affine = false): a fold there turns
    the flag on, so the stock class builds the weights the checkpoint now carries."""
    from diffusers import PixArtTransformer2DModel

    src = pipes["pixart"]
    root = load_pipeline(src)
    spec = random_spec(root, ["transformer.transformer_blocks.0.norm1:output"], seed=3)
    write(spec, tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", log=lambda *_: None)
    assert res.verification["passed"] and res.config_changes["transformer.norm_elementwise_affine"] is True
    tr = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "out" / "transformer"))
    assert tr.config.norm_elementwise_affine is True
    n1, n2 = tr.transformer_blocks[0].norm1, tr.transformer_blocks[1].norm2
    assert not torch.equal(n1.weight, torch.ones_like(n1.weight))  # the fold
    assert torch.equal(n2.weight, torch.ones_like(n2.weight)) and not n2.bias.any()  # a companion


def test_group_norm_maps_are_per_channel(pipes):
    """A map on a 4-D GroupNorm output acts on dim 1 (channels) at every pixel."""
    root = load_pipeline(pipes["sd"])
    site = "unet.down_blocks.0.resnets.0.norm1:output"
    info = AD.sites(root)[site]
    assert info.unit_dim == 1 and info.units == 16
    a, b = 1 + torch.rand(16), torch.randn(16)
    spec = Spec([(site, [Map("affine", 1.0, {"a": a, "b": b})])], method="t")
    norm = root.get_submodule(info.module)
    x = torch.randn(2, 16, 4, 4)
    with steered(root, spec, check_model=False):
        got = norm(x)
    want = norm(x) * a[None, :, None, None] + b[None, :, None, None]
    assert torch.allclose(got, want, atol=1e-6)


def test_onnx_denoiser(tmp_path, pipes):
    import onnxruntime as ort

    src = pipes["sd"]
    root = load_pipeline(src)
    write(random_spec(root, ["norms"], seed=4), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["safetensors", "onnx"],
                        log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["onnx_denoiser_rel"] <= 1e-4 and v["latent_rel"] <= 1e-5
    sess = ort.InferenceSession(str(tmp_path / "out" / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["sample", "timestep", "encoder_hidden_states"]
    # a batch size other than the traced one runs
    feed = {"sample": torch.randn(3, 4, 8, 8).numpy(), "timestep": torch.tensor(10).numpy(),
            "encoder_hidden_states": torch.randn(3, 16, 32).numpy()}
    assert sess.run(None, {k: feed[k] for k in names})[0].shape == (3, 4, 8, 8)


def test_flux_onnx_verifies_and_runs_other_shapes(tmp_path, pipes):
    """FLUX's denoiser goes through the dynamo exporter: it equals the hooked reference in ONNX Runtime,
    and the graph runs a batch of 3 and another resolution (fewer image tokens, shorter img_ids)."""
    import onnxruntime as ort

    from bake.exporters.onnx_denoiser import _Call, as_kwargs, capture, flatten

    src = pipes["flux"]
    root = load_pipeline(src)
    write(random_spec(root, ["norms"], seed=5), tmp_path / "s.json")
    res = compiler.apply(str(src), [str(tmp_path / "s.json")], tmp_path / "out", formats=["safetensors", "onnx"],
                         log=lambda *_: None)
    v = res.verification
    assert v["passed"] and v["onnx_denoiser_rel"] <= 1e-4
    baked = load_pipeline(tmp_path / "out")
    sess = ort.InferenceSession(str(tmp_path / "out" / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"])
    want = {i.name for i in sess.get_inputs()}
    for size, batch in ((32, 3), (64, 1)):
        args, kwargs = capture(baked, size)
        names, values, frozen = flatten(as_kwargs(baked.transformer, args, kwargs))
        values = [x.repeat(batch, *[1] * (x.dim() - 1)) if x.dim() and x.shape[0] == 1 else x for x in values]
        with torch.no_grad():
            ref = _Call(baked.transformer, names, frozen)(*values).numpy()
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, values) if n in want})[0]
        assert got.shape == ref.shape and got.shape[0] == batch
        assert abs(got - ref).max() / abs(ref).max() <= 1e-4


def test_pixart_onnx_is_refused_before_work(tmp_path, pipes, capsys):
    root = load_pipeline(pipes["pixart"])
    write(random_spec(root, ["norms"], seed=5), tmp_path / "s.json")
    rc = main(["apply", "--model", str(pipes["pixart"]), "--spec", str(tmp_path / "s.json"), "--out",
               str(tmp_path / "out"), "--format", "onnx"])
    assert rc == 2 and "PixArtTransformer2DModel denoiser is not exported to ONNX" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fit_style_then_bake(tmp_path, pipes, capsys):
    """bake fit on a pipeline: captions with and without a style word, a one-step call; then apply."""
    objects = ["a cat", "a dog at night", "a house", "a tree", "a red car", "a city", "a portrait", "a landscape"]
    (tmp_path / "plain.txt").write_text("\n".join(objects) + "\n")
    (tmp_path / "style.txt").write_text("\n".join(f"{o} in the style of van gogh" for o in objects) + "\n")
    spec = tmp_path / "style.json"
    assert main(["fit", "--model", str(pipes["sd"]), "--source", str(tmp_path / "plain.txt"), "--target",
                 str(tmp_path / "style.txt"), "--method", "mean-act", "--out", str(spec)]) == 0
    m = json.loads(spec.read_text())
    assert m["params"]["sites"] == ["norms"] and len(m["sites"]) == 33
    from bake.spec import read

    fitted = read(spec)
    moved = [s for s, maps in fitted.sites if maps[0].tensors["b"].abs().max() > 1e-6]
    still = [s for s, maps in fitted.sites if maps[0].tensors["b"].abs().max() == 0]
    # the text only reaches the UNet through cross-attention: the blocks before the first one see the same
    # latents for both prompt sets, so their maps are exactly the identity
    assert "unet.down_blocks.0.resnets.0.norm1:output" in still and len(moved) > 10
    assert main(["apply", "--model", str(pipes["sd"]), "--spec", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "verify: PASS" in out
    assert main(["verify", "--model", str(pipes["sd"]), "--spec", str(spec), "--baked", str(tmp_path / "out")]) == 0


def test_bad_input(tmp_path, pipes, capsys):
    sd = load_pipeline(pipes["sd"])
    write(random_spec(sd, ["norms"], seed=6), tmp_path / "sd.json")
    # a spec for one pipeline applied to another
    rc = main(["apply", "--model", str(pipes["pixart"]), "--spec", str(tmp_path / "sd.json"), "--out",
               str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert rc == 2 and "spec.sites[0].site: 'unet.down_blocks.0.resnets.0.norm1:output' is not a site" in err
    # a site on a component the pipeline lacks
    write(Spec([("text_encoder_2.encoder.layers.0.layer_norm1:output",
                 [Map("additive", 1.0, {"v": torch.ones(32)})])], method="t"), tmp_path / "t2.json")
    rc = main(["apply", "--model", str(pipes["sd"]), "--spec", str(tmp_path / "t2.json"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "text_encoder_2.encoder.layers.0.layer_norm1:output" in capsys.readouterr().err
    # a method that does not run on pipelines
    (tmp_path / "a.txt").write_text("a cat\na dog\na tree\na house\na car\n")
    rc = main(["fit", "--model", str(pipes["sd"]), "--source", str(tmp_path / "a.txt"), "--target",
               str(tmp_path / "a.txt"), "--method", "lineas", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "not available for diffusers pipelines" in capsys.readouterr().err
    # a shift where T5 has no bias slot
    pix = load_pipeline(pipes["pixart"])
    write(random_spec(pix, ["text_encoder.encoder.block.0.layer.0.layer_norm:output"], seed=7), tmp_path / "t5.json")
    with pytest.raises(BakeError, match="needs a bias on text_encoder.encoder.block.0.layer.0.SelfAttention.q"):
        compiler.apply(str(pipes["pixart"]), [str(tmp_path / "t5.json")], tmp_path / "o3", log=lambda *_: None)
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()
    # not a pipeline and not a model
    (tmp_path / "empty").mkdir()
    assert main(["apply", "--model", str(tmp_path / "empty"), "--spec", str(tmp_path / "sd.json"), "--out",
                 str(tmp_path / "o4")]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_hub_id_of_a_cached_pipeline_loads_offline(tmp_path, pipes, monkeypatch):
    """`--model org/name` finds a pipeline in the local Hugging Face cache (its snapshot layout) with no
    network: the real loading path for hub ids, exercised on local files."""
    import shutil

    from bake.models import resolve

    cache = tmp_path / "hub"
    snap = cache / "models--bake-test--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(pipes["sd"], snap)
    (cache / "models--bake-test--tiny-sd" / "refs").mkdir()
    (cache / "models--bake-test--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert resolve("bake-test/tiny-sd") == snap
    root = load_pipeline(resolve("bake-test/tiny-sd"))
    assert type(root.pipeline).__name__ == "StableDiffusionPipeline"
