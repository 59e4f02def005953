"""The diffusers family: the sites of a pipeline's denoiser and text encoders.

A pipeline is bound as one `PipelineModel` (bake.models.diffusion) whose children are the pipeline's
torch components, so a site is named `component.module.path:side`
(`unet.down_blocks.0.resnets.0.norm1:output`, `text_encoder.encoder.layers.3.layer_norm2:output`)
and every pass works unchanged.

Denoisers (UNet2DConditionModel, Transformer2DModel / PixArt, FluxTransformer2DModel, ...): every
GroupNorm and LayerNorm with affine parameters is a `norm` site, mapped per channel (dim 1 of a 4-D
GroupNorm output, the last dim of a token tensor) at every pixel and every denoising step; the scale
and the shift fold exactly into the norm's weight and bias. Flux's adaLN-Zero outputs feed only the
attention's q/k/v (and the single blocks' MLP) projections, which have biases: a map there folds
into them. Linear layers give `linear` sites as in the causal LMs.

Text encoders: CLIP (every Linear and LayerNorm has a bias: everything folds) and T5 (RMS norms and
bias-free projections: scales fold, shifts need an inserted module).
"""

from __future__ import annotations

import torch

from ..errors import BakeError
from ..models.diffusion import DENOISERS, TEXT_ENCODERS, PipelineModel
from .table import Adapter, SiteInfo

# the denoiser classes the ONNX exporter writes, and with which exporter: the TorchScript tracer where it
# keeps the shapes generic, else torch.export + the dynamo exporter (FLUX: the tracer freezes the rotary
# embedding's shapes and has no aten::rms_norm)
ONNX_DENOISERS = {"UNet2DConditionModel": "torchscript", "FluxTransformer2DModel": "dynamo"}
ONNX_REFUSED = {  # why the others are not exported
    "PixArtTransformer2DModel": "the TorchScript trace keeps a squeeze on a dimension that is only 1 in the traced "
                                "call, and torch.export cannot relate its attention mask's batch × heads repeat to "
                                "the image tokens",
}


# --- component adapters: sites of one component, names relative to it --------------------------------

def _norm(path: str, mod: torch.nn.Module, consumers: tuple[str, ...] = ()) -> SiteInfo | None:
    if isinstance(mod, torch.nn.GroupNorm):
        if not mod.affine:
            return None
        return SiteInfo(f"{path}:output", path, "output", "norm", mod.num_channels, consumers, anchor=f"{path}.weight",
                        unit_dim=1)
    if getattr(mod, "weight", None) is None:
        return None
    return SiteInfo(f"{path}:output", path, "output", "norm", mod.weight.shape[0], consumers, anchor=f"{path}.weight")


def _linear(path: str, mod: torch.nn.Linear) -> list[SiteInfo]:
    return [SiteInfo(f"{path}:input", path, "input", "linear", mod.in_features, anchor=f"{path}.weight"),
            SiteInfo(f"{path}:output", path, "output", "linear", mod.out_features, anchor=f"{path}.weight")]


# adaLN-Zero modules of Flux-style blocks (by attribute name) and the projections that alone read output[0]
ADALN_ZERO = {("AdaLayerNormZero", "norm1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
              ("AdaLayerNormZero", "norm1_context"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              ("AdaLayerNormZeroSingle", "norm"): ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")}


NORM_FLAG = "norm_elementwise_affine"


def flag_norms(comp: torch.nn.Module) -> frozenset[str]:
    """The LayerNorms (paths) that have no weight because the component's config says
    `norm_elementwise_affine = false` (PixArt), found by building the component with the flag on,
    on the meta device: turning the flag on gives exactly these a weight and a bias."""
    cfg = getattr(comp, "config", None)
    if cfg is None or cfg.get(NORM_FLAG, True) is not False:
        return frozenset()
    with torch.device("meta"):
        twin = type(comp).from_config({**dict(cfg), NORM_FLAG: True})
    return frozenset(p for p, m in twin.named_modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None
                     and getattr(comp.get_submodule(p), "weight", None) is None)


def denoiser_sites(comp: torch.nn.Module) -> list[SiteInfo]:
    """Every affine norm (or one the config flag makes affine), adaLN-Zero output (Flux) and Linear of a
    denoiser, in module order."""
    out: list[SiteInfo] = []
    flagged = flag_norms(comp)
    params = [n for n, _ in comp.named_parameters()]
    for path, mod in comp.named_modules():
        if not path:
            continue
        block, _, attr = path.rpartition(".")
        key = (type(mod).__name__, attr)
        if key in ADALN_ZERO:  # output[0] feeds only these projections of the enclosing block
            consumers = tuple(f"{block}.{c}" for c in ADALN_ZERO[key])
            if all(_has_bias_linear(comp, c) for c in consumers):
                out.append(SiteInfo(f"{path}:output", path, "output", "norm", mod.linear.in_features, consumers,
                                    anchor=f"{path}.linear.weight"))
        elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            info = _norm(path, mod)
            if info is None and path in flagged:  # anchored on the first weight of its block
                anchor = next(n for n in params if n.startswith(block + "."))
                info = SiteInfo(f"{path}:output", path, "output", "norm", mod.normalized_shape[0], anchor=anchor)
            if info is not None:
                out.append(info)
        elif isinstance(mod, torch.nn.Linear):
            out += _linear(path, mod)
    return out


def _has_bias_linear(comp: torch.nn.Module, path: str) -> bool:
    try:
        mod = comp.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(mod, torch.nn.Linear) and mod.bias is not None


def clip_sites(comp: torch.nn.Module) -> list[SiteInfo]:
    """CLIP text encoder: pre-norm layers, every Linear and LayerNorm with a bias."""
    root = "text_model." if hasattr(comp, "text_model") else ""  # transformers 5 flattened CLIPTextModel
    enc = f"{root}encoder.layers"
    out: list[SiteInfo] = []
    for i in range(len(comp.get_submodule(enc))):
        p = f"{enc}.{i}"
        qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
        out.append(_norm(f"{p}.layer_norm1", comp.get_submodule(f"{p}.layer_norm1"), qkv))
        for path in qkv + (f"{p}.self_attn.out_proj",):
            out += _linear(path, comp.get_submodule(path))
        out.append(_norm(f"{p}.layer_norm2", comp.get_submodule(f"{p}.layer_norm2"), (f"{p}.mlp.fc1",)))
        for path in (f"{p}.mlp.fc1", f"{p}.mlp.fc2"):
            out += _linear(path, comp.get_submodule(path))
        out.append(SiteInfo(f"{p}:output", p, "output", "residual", comp.config.hidden_size, writer=f"{p}.mlp.fc2",
                            anchor=f"{p}.mlp.fc2.weight"))
    out.append(_norm(f"{root}final_layer_norm", comp.get_submodule(f"{root}final_layer_norm")))
    return out


def t5_sites(comp: torch.nn.Module) -> list[SiteInfo]:
    """T5 encoder: RMS norms (weight only) and bias-free projections."""
    out: list[SiteInfo] = []
    for i, block in enumerate(comp.encoder.block):
        p = f"encoder.block.{i}"
        qkv = tuple(f"{p}.layer.0.SelfAttention.{x}" for x in "qkv")
        out.append(_norm(f"{p}.layer.0.layer_norm", block.layer[0].layer_norm, qkv))
        for path in qkv + (f"{p}.layer.0.SelfAttention.o",):
            out += _linear(path, comp.get_submodule(path))
        ff = f"{p}.layer.1.DenseReluDense"
        ins = tuple(f"{ff}.{n}" for n, m in comp.get_submodule(ff).named_children()
                    if isinstance(m, torch.nn.Linear) and n != "wo")
        out.append(_norm(f"{p}.layer.1.layer_norm", block.layer[1].layer_norm, ins))
        for path in ins + (f"{ff}.wo",):
            out += _linear(path, comp.get_submodule(path))
    out.append(_norm("encoder.final_layer_norm", comp.encoder.final_layer_norm))
    return out


TEXT_FAMILIES = {"CLIPTextModel": clip_sites, "CLIPTextModelWithProjection": clip_sites,
                 "T5EncoderModel": t5_sites}


def _prefixed(comp: str, s: SiteInfo) -> SiteInfo:
    q = lambda p: f"{comp}.{p}" if p else p  # noqa: E731
    return SiteInfo(f"{comp}.{s.name}", q(s.module), s.side, s.role, s.units, tuple(q(c) for c in s.consumers),
                    q(s.writer) if s.writer else None, q(s.anchor), s.unit_dim)


class PipelineAdapter(Adapter):
    """Sites of every denoiser and text encoder of a pipeline, prefixed by the component name."""

    ROLE_PRESETS = {
        "norms": "all affine norm outputs of the denoiser (GroupNorm and LayerNorm; AcT's T2I sites)",
        "group-norms": "the denoiser's GroupNorm outputs",
        "layer-norms": "the denoiser's LayerNorm outputs (and Flux's adaLN-Zero outputs)",
        "attn-out": "the denoiser's attention output projections",
        "text-norms": "the text encoders' norm outputs",
        "text-residual": "the text encoders' layer outputs",
    }

    def __init__(self):
        super().__init__(family="diffusers", model_types=("diffusers",), presets=dict.fromkeys(self.ROLE_PRESETS, ()),
                         modality="text-to-image")

    def sites(self, model: torch.nn.Module) -> dict[str, SiteInfo]:
        infos: list[SiteInfo] = []
        for comp, mod in model.named_children():
            kind = type(mod).__name__
            if comp in DENOISERS:
                infos += [_prefixed(comp, s) for s in denoiser_sites(mod)]
            elif comp in TEXT_ENCODERS and kind in TEXT_FAMILIES:
                infos += [_prefixed(comp, s) for s in TEXT_FAMILIES[kind](mod)]
        return {s.name: s for s in infos}

    def preset(self, model: torch.nn.Module, name: str, catalog: dict[str, SiteInfo]) -> list[str]:
        den = model.denoiser_name()
        in_den = lambda s: s.module.split(".", 1)[0] == den  # noqa: E731
        is_group = lambda s: isinstance(model.get_submodule(s.module), torch.nn.GroupNorm)  # noqa: E731
        pick = {
            "norms": lambda s: in_den(s) and s.role == "norm",
            "group-norms": lambda s: in_den(s) and s.role == "norm" and is_group(s),
            "layer-norms": lambda s: in_den(s) and s.role == "norm" and not is_group(s),
            "attn-out": lambda s: in_den(s) and s.side == "output" and s.role == "linear"
                                  and s.module.endswith(".to_out.0"),
            "text-norms": lambda s: not in_den(s) and s.role == "norm",
            "text-residual": lambda s: not in_den(s) and s.role == "residual",
        }[name]
        return [n for n, s in catalog.items() if pick(s)]

    def resolve(self, model: torch.nn.Module, patterns: list[str]) -> list[str]:
        catalog = self.sites(model)
        chosen: set[str] = set()
        globs = []
        for pat in patterns:
            if pat in self.ROLE_PRESETS:
                hit = self.preset(model, pat, catalog)
                if not hit:
                    raise BakeError(f"--sites: preset {pat!r} matches no site of this pipeline "
                                    f"({type(model.pipeline).__name__}: {self.ROLE_PRESETS[pat]})")
                chosen.update(hit)
            else:
                globs.append(pat)
        if globs:
            chosen.update(Adapter.resolve(self, model, globs))
        return [n for n in catalog if n in chosen]

    def norm_flag(self, model: torch.nn.Module, path: str) -> tuple[str, str, frozenset[str]] | None:
        """(component, config flag, the norms it controls) if a config flag can give this norm a weight."""
        comp = path.split(".", 1)[0]
        flagged = flag_norms(model.get_submodule(comp))
        rel = path.split(".", 1)[1]
        return (comp, NORM_FLAG, flagged) if rel in flagged else None

    def bias_group(self, linear_path: str):
        return None  # every fold here uses biases the stock classes already have, or is refused

    def layers_prefix(self) -> str:
        return ""

    variants = ("sd", "sdxl", "flux", "pixart")  # the tiny pipelines `bake families` probes

    def tiny(self, variant: str = "sd") -> torch.nn.Module:
        from ..models.tiny_pipelines import tiny_pipeline

        return PipelineModel(tiny_pipeline(variant))


DIFFUSERS = PipelineAdapter()
