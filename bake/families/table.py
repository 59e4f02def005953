"""A family as data: the table (`Adapter`) that says what the sites of a model are and how
activations flow between its modules. Passes ask the table, never class names.

A decoder family is declared, not coded: its layer prefix, each layer's `graph` (norms with the
Linear modules that alone read them, and Linear modules, in graph order), the residual stream's last
writer, its bias groups (which config flag turns on which biases, and the family to relabel to where
the class hard-codes them off), the norm convention (weight w or 1 + w), presets and capabilities
(ONNX, onnxruntime-genai, modality). Only what a table cannot say is code (a relabel, the
diffusers adapter's site discovery). A site is one activation tensor named
`module.path:input` or `module.path:output`; its `role` says how maps there can fold:

- `linear`  : input or output of an nn.Linear (fold into its weight / bias)
- `norm`    : output of a normalisation layer (scale into the norm weight, the rest into `consumers`)
- `residual`: the residual stream after a decoder layer (an additive map folds into `writer`'s bias)
- `sum`     : output of a block that sums linear producers, as a mixture of experts sums its experts'
              down projections weighted by the router: y = Σ_e g_e(x) W_e h_e. A linear map M on y folds
              into every producer (W_e' = M W_e, biases too), whatever the router's weights are.

Parameters that are not an nn.Linear's (a mixture of experts keeps all its experts in one 3-D tensor)
are named by a `Slot`: the parameter and the dimension that holds the hidden units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import BakeError


@dataclass(frozen=True)
class Slot:
    """A weight that reads (a consumer) or writes (a producer) the hidden units on dimension `dim`, and
    its bias over the other outputs (reader) or over the hidden units (producer; last dimension)."""

    param: str
    dim: int
    bias: str | None = None

    def under(self, prefix: str) -> "Slot":
        return Slot(f"{prefix}.{self.param}", self.dim, f"{prefix}.{self.bias}" if self.bias else None)


@dataclass(frozen=True)
class SiteInfo:
    name: str
    module: str
    side: str
    role: str
    units: int
    consumers: tuple[str, ...] = ()  # Linear modules that read this tensor and nothing else does
    writer: str | None = None  # residual: the Linear whose output is added last to the stream
    anchor: str = ""  # parameter whose bytes identify the model at this site (fingerprint)
    unit_dim: int = -1  # the tensor dimension that holds the units (1: channels of a 4-D conv feature map)
    slots: tuple[Slot, ...] = ()  # norm: readers that are no nn.Linear (experts); sum: the producers
    shift_slots: tuple[Slot, ...] = ()  # sum / residual: biases a shift goes into (each added once per token)
    writer_scale: float = 1.0  # residual: the stream adds writer_scale × the writer's output


@dataclass
class BiasGroup:
    """A config flag that turns on the biases of several Linear modules in every layer.

    `relabel` names the family whose class has the flag when this family's class hard-codes
    `bias=False` (Qwen2, Mistral → Llama: the same math with bias flags)."""

    flag: str
    members: tuple[str, ...]  # module names relative to a layer
    relabel: str | None = None


def linear_dims(mod: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or of a GPT-2 style Conv1D (weight stored [in, out])."""
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    return mod.weight.shape[0], mod.weight.shape[1]


def linear_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a transposed view for Conv1D)."""
    return mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()


@dataclass(frozen=True)
class Norm:
    """A norm of a layer and the Linear modules that alone read its output (relative to the layer);
    none: it writes the residual stream (or feeds a head without a bias slot)."""

    path: str
    consumers: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()  # readers that are no nn.Linear module (a mixture of experts' weights)


@dataclass(frozen=True)
class Block:
    """A block (a mixture of experts) whose output is a sum of its `producers`' outputs: a `sum` site."""

    path: str
    producers: tuple[Slot, ...]
    shift_folds: bool = False  # a shift added to every producer's bias is added once (router weights sum to 1)


@dataclass(frozen=True)
class Layer:
    """One decoder layer's graph, where the layers are not all built alike (a hybrid, dense then MoE)."""

    graph: tuple
    residual_writer: str | None = None
    residual_anchor: str | None = None
    residual_scale: float = 1.0  # b = a + c·writer(x): c (MiniCPM's depth scale 1.4/√L), 1 elsewhere


@dataclass(frozen=True)
class Mlp:
    """A gated MLP, down(act(gate z) ⊙ up z), relative to a layer: its module names, its activation's
    attribute and the config key of its width (the same in every layer). `units` maps grow it."""

    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"
    size: str = "intermediate_size"

    def parts(self, layer: str) -> tuple[str, str, str, str]:
        """(gate, up, down, act) module paths of the layer at `layer`."""
        return tuple(f"{layer}.{rel}" for rel in (self.gate, self.up, self.down, self.act))


@dataclass(frozen=True)
class Tiny:
    """A two-layer random model of the family: transformers config and model class names, config keys."""

    config: str
    model: str
    kwargs: tuple[tuple[str, object], ...] = ()


@dataclass
class Adapter:
    family: str
    model_types: tuple[str, ...]
    presets: dict[str, tuple[str, ...]]
    bias_groups: tuple[BiasGroup, ...] = field(default_factory=tuple)
    norm_weight_offset: float = 0.0  # Gemma-style norms scale by (offset + weight)
    final_norm: str | None = "model.norm"  # None: no norm (with a weight) after the layers
    about: str = ""
    modality: str = "causal-lm"  # or "text-to-image" (a diffusers pipeline)
    layers: str = "model.layers"  # the decoder layers' ModuleList
    graph: tuple[Norm | Block | str, ...] = ()  # per layer, in graph order: norms, blocks and Linear modules
    residual_writer: str | None = None  # the Linear whose output is added last to the stream (None: a norm)
    residual_anchor: str | None = None  # the parameter identifying a layer output site (default: the writer's)
    residual_scale: float = 1.0  # the last write is c·writer(x) (see Layer)
    relabel_to: str | None = None  # the family whose class has the bias flags this one hard-codes off
    tiny_model: Tiny | None = None
    onnx_genai: bool = False  # onnxruntime-genai runs this model type
    per_layer: tuple[Layer, ...] = ()  # one per layer where they differ (then graph/residual_* are unused)
    gguf_arch: str | None = None  # llama.cpp's architecture name, where bake writes GGUF for this family
    gguf_biases: tuple[str, ...] = ()  # the GGUF tensors whose bias llama.cpp's loader for it reads
    mlp: Mlp | None = Mlp()  # the gated MLP that `units` maps grow (None: the family has none)

    def matches(self, model: torch.nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in self.model_types

    def sites(self, model: torch.nn.Module) -> dict[str, SiteInfo]:
        """Every site in graph order: each decoder layer's, then the final norm's."""
        h = model.config.hidden_size
        infos: list[SiteInfo] = []
        for i, path in enumerate(self.layer_paths(model)):
            infos += self.layer_sites(model, path, h, self.layer(i))
        if self.final_norm:  # feeds lm_head (no bias): scale only
            infos.append(self.norm_site(self.final_norm, h))
        return {s.name: s for s in infos}

    def layer(self, i: int) -> Layer:
        """Layer i's graph and residual writer."""
        if self.per_layer:
            return self.per_layer[i]
        return Layer(self.graph, self.residual_writer, self.residual_anchor, self.residual_scale)

    def layer_sites(self, model: torch.nn.Module, p: str, h: int, layer: Layer) -> list[SiteInfo]:
        """The sites of the layer at `p`, from its graph, then the layer output (residual)."""
        infos: list[SiteInfo] = []
        shift: tuple[Slot, ...] = ()
        for item in layer.graph:
            if isinstance(item, Norm):
                infos.append(self.norm_site(f"{p}.{item.path}", h, tuple(f"{p}.{c}" for c in item.consumers),
                                            tuple(s.under(p) for s in item.slots)))
            elif isinstance(item, Block):
                slots = tuple(s.under(p) for s in item.producers)
                shift = slots if item.shift_folds else ()
                infos.append(SiteInfo(f"{p}.{item.path}:output", f"{p}.{item.path}", "output", "sum", h,
                                      anchor=slots[0].param, slots=slots, shift_slots=shift))
            else:
                infos += self.linear_sites(model, f"{p}.{item}")
        w = layer.residual_writer
        anchor = layer.residual_anchor or f"{w}.weight"
        last_is_block = bool(layer.graph) and isinstance(layer.graph[-1], Block) and not w
        return infos + [SiteInfo(f"{p}:output", p, "output", "residual", h, writer=f"{p}.{w}" if w else None,
                                 writer_scale=layer.residual_scale, anchor=f"{p}.{anchor}",
                                 shift_slots=shift if last_is_block else ())]

    @staticmethod
    def linear_sites(model: torch.nn.Module, path: str) -> list[SiteInfo]:
        """The input and output sites of an nn.Linear."""
        n_in, n_out = linear_dims(model.get_submodule(path))
        return [SiteInfo(f"{path}:input", path, "input", "linear", n_in, anchor=f"{path}.weight"),
                SiteInfo(f"{path}:output", path, "output", "linear", n_out, anchor=f"{path}.weight")]

    @staticmethod
    def norm_site(path: str, units: int, consumers: tuple[str, ...] = (), slots: tuple[Slot, ...] = ()) -> SiteInfo:
        return SiteInfo(f"{path}:output", path, "output", "norm", units, consumers=consumers, anchor=f"{path}.weight",
                        slots=slots)

    def layers_prefix(self) -> str:
        return self.layers

    def layer_paths(self, model: torch.nn.Module) -> list[str]:
        """The module path of every decoder layer, in order."""
        return [f"{self.layers_prefix()}.{i}" for i in range(model.config.num_hidden_layers)]

    def mlp_layer(self, site: SiteInfo) -> str | None:
        """The layer whose gated MLP's output is `site` (`…mlp.down_proj:output`), or None."""
        if self.mlp is None or site.side != "output" or not site.module.endswith("." + self.mlp.down):
            return None
        layer = site.module[: -len(self.mlp.down) - 1]
        return layer if layer.startswith(self.layers_prefix() + ".") else None

    def mlp_of(self, site: SiteInfo) -> tuple[str, str, str, str] | None:
        """(gate, up, down, act) of the gated MLP whose output is `site`, or None."""
        layer = self.mlp_layer(site)
        return None if layer is None else self.mlp.parts(layer)

    def norm_flag(self, model: torch.nn.Module, path: str):
        """(component, config flag, controlled norms) when a config flag can give the norm at `path` a
        weight and a bias; None in the causal LM families (their norms always have a weight)."""
        return None

    def tiny(self) -> torch.nn.Module:
        """A two-layer random model of this family (for `bake families` and the tests)."""
        import transformers

        t = self.tiny_model
        cfg = getattr(transformers, t.config)(**dict(t.kwargs))
        return getattr(transformers, t.model)(cfg).eval()

    def relabel(self, model: torch.nn.Module, flags: dict[str, bool]) -> tuple[torch.nn.Module, list[str]]:
        """The same model as another family's class with `flags` on; returns it and notes for the report."""
        from .relabel import RELABELS

        if self.relabel_to not in RELABELS:
            raise BakeError(f"{self.family}: no relabel to another family is known")  # pragma: no cover
        return RELABELS[self.relabel_to](model, flags)

    def bias_group(self, linear_path: str) -> BiasGroup | None:
        """The flag that gives `linear_path` a bias, or None if it can never have one."""
        prefix = self.layers_prefix() + "."
        if not linear_path.startswith(prefix):
            return None
        rel = linear_path[len(prefix):].split(".", 1)[1]
        for g in self.bias_groups:
            if rel in g.members:
                return g
        return None

    def resolve(self, model: torch.nn.Module, patterns: list[str]) -> list[str]:
        """Presets and globs → resolved site names in graph order.

        In a glob `*` matches within one dotted name (`model.layers.*:output` is the layer outputs,
        not every projection inside them), `?` one character, `**` anything; a glob that does not
        match from the start matches a suffix after a dot (`mlp.down_proj:input`)."""
        catalog = self.sites(model)
        chosen: set[str] = set()
        for pat in patterns:
            hit = self._matches(catalog, pat)
            if not hit:
                raise BakeError(f"--sites: {pat!r} matches no site of this {self.family} model "
                                f"(presets: {', '.join(self.offered(model)) or 'none'}; or a glob like "
                                f"'mlp.down_proj:input')")
            chosen |= hit
        return [n for n in catalog if n in chosen]

    def _matches(self, catalog, pat: str) -> set[str]:
        """The sites of `catalog` a preset or glob names."""
        rxs = [glob_regex(g) for g in self.presets.get(pat, (pat,))]
        return {name for name in catalog if any(rx.fullmatch(name) for rx in rxs)}

    def offered(self, model: torch.nn.Module) -> list[str]:
        """The presets that name at least one site of this model (a family's table may list one that a
        configuration lacks, e.g. attn-out where attention writes through the MLP's output)."""
        catalog = self.sites(model)
        return [p for p in self.presets if self._matches(catalog, p)]


def glob_regex(glob: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^.:]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^.:]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("(?:.*\\.)?" + "".join(out))
