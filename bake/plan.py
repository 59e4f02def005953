"""A plan: one or more specs bound to a concrete model.

Binding checks everything that can be checked before any work: each site exists in the model,
unit counts match, and the model is the one the spec was fitted on (fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import BakeError
from .maps import LinearMap, Map
from .families import Adapter, SiteInfo, adapter_for
from .models import fingerprint
from .spec import Spec
from .store import ModuleStore, TensorStore


@dataclass
class SitePlan:
    info: SiteInfo
    maps: list[Map]  # the maps of every spec at this site, in application order
    pending: list[Map | LinearMap] = field(default_factory=list)  # what passes have still to place

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class Plan:
    model: torch.nn.Module  # the skeleton: module types and shapes (on the meta device for a checkpoint)
    adapter: Adapter
    sites: list[SitePlan]
    specs: list[Spec]
    store: TensorStore  # the tensors, read and written by name
    biased: set[str] = field(default_factory=set)  # Linear modules that gained a bias
    report: list[tuple[str, str, str]] = field(default_factory=list)  # (pass, site, what it did)
    config_changes: dict[str, object] = field(default_factory=dict)
    insert_modules: bool = False  # keep what does not fold as inserted modules (needs generated code)
    approximate: bool = False  # fold support-masked affine maps as if their support were unbounded
    inserted: list[dict] = field(default_factory=list)  # config entries of the inserted modules
    fold_dtype: torch.dtype = torch.float64  # weight products; float32 when the output is bf16 / fp16
    norm_flags: dict = field(default_factory=dict)  # component → (flag, norms it controls) turned on by folds
    grown: dict = field(default_factory=dict)  # layer path → [(G, U, D)]: units the grow-mlp pass appends

    def note(self, pass_name: str, site: str, what: str) -> None:
        self.report.append((pass_name, site, what))

    def pending_at(self, module: str, side: str) -> bool:
        """A map at `module:side` that no fold placed (it stays an inserted module). A fold that would move
        another map across it (into that module's weight from the other side of the inserted module)
        must not run: the order of the two maps would change."""
        return any(sp.pending for sp in self.sites if sp.info.module == module and sp.info.side == side)


def check_fingerprint(spec: Spec, model: torch.nn.Module, infos: list[SiteInfo], where: str,
                      store: TensorStore) -> None:
    """The model is the one the spec was fitted on: same architecture and shapes, and the same weights by
    `weights_digest` (the whole model, sampled), or, for specs written before it, by the hash of the
    sites' anchor tensors. A spec with no model block proves nothing and is refused."""
    want = spec.model
    if not want:
        raise BakeError(f"{where}.model: the spec has no model block (fingerprint), so nothing shows it was fitted "
                        f"on this model; pass --ignore-fingerprint to apply it anyway")
    have = fingerprint(model, infos, store.get, store.rows)
    for key in ("architecture", "model_type"):
        if key in want and want[key] != have[key]:
            raise BakeError(f"{where}.model.{key}: spec was fitted on {want[key]!r}, this model is {have[key]!r}")
    for key, val in want.get("shapes", {}).items():
        if have["shapes"].get(key) != val:
            raise BakeError(f"{where}.model.shapes.{key}: spec was fitted on {val}, this model has "
                            f"{have['shapes'].get(key)}")
    if "weights_digest" in want:
        if want["weights_digest"] != have["weights_digest"]:
            raise BakeError(f"{where}.model.weights_digest: spec was fitted on a model with other weights (pass "
                            f"--ignore-fingerprint to apply it anyway)")
    elif "weights_sha256" in want and want["weights_sha256"] != have["weights_sha256"]:
        raise BakeError(f"{where}.model.weights_sha256: spec was fitted on a model with other weights at its "
                        f"sites (pass --ignore-fingerprint to apply it anyway)")


def check_units(adapter: Adapter, model: torch.nn.Module, info: SiteInfo, maps: list[Map], where: str) -> None:
    """A `units` map sits at the output of a gated MLP, down(act(gate z) ⊙ up z), and reads z's width. On a
    loaded model the MLP is run once on random inputs to show it computes that (a probe-derived family's
    MLP might not); a skeleton on the meta device is taken at its family table's word."""
    parts = adapter.mlp_of(info)
    if parts is None:
        raise BakeError(f"{where}.site: a units map goes at the output of a gated MLP (e.g. "
                        f"model.layers.3.mlp.down_proj:output); {info.name} is not one in this {adapter.family} model")
    try:
        gate, up, down, act = (model.get_submodule(p) for p in parts)
    except AttributeError:
        raise BakeError(f"{where}.site: {info.module} is not the down projection of a gated MLP "
                        f"(gate_proj, up_proj, act_fn) in this {adapter.family} model") from None
    _check_growable(adapter, model, where)
    d_in = gate.weight.shape[1]
    for m in maps:
        if m.needs_context and m.tensors["gate"].shape[1] != d_in:
            raise BakeError(f"{where}.maps: a units map reads {m.tensors['gate'].shape[1]} inputs, the MLP at "
                            f"{info.module} reads {d_in}")
    if gate.weight.is_meta:
        return
    mlp = model.get_submodule(parts[2].rsplit(".", 1)[0])
    z = torch.randn(2, 3, d_in, generator=torch.Generator().manual_seed(0)).to(gate.weight)
    with torch.no_grad():
        want, got = down(act(gate(z)) * up(z)), mlp(z)
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        raise BakeError(f"{where}.site: the MLP at {info.module.rsplit('.', 1)[0]} does not compute "
                        f"down(act(gate z) ⊙ up z), so a units map cannot grow it")


def _check_growable(adapter: Adapter, model: torch.nn.Module, where: str) -> None:
    """Growing adds units to every layer's MLP under one config width: it must be one integer, the width
    of every layer's gated MLP (not per-layer widths, not a mixture of experts in some layers)."""
    width = getattr(model.config, adapter.mlp.size, None)
    if not isinstance(width, int):
        raise BakeError(f"{where}.site: this {adapter.family} model's {adapter.mlp.size} is {width!r}, not one width "
                        f"for every layer, so units maps cannot grow its MLPs")
    for i, layer in enumerate(adapter.layer_paths(model)):
        gate = adapter.mlp.parts(layer)[0]
        try:
            rows = model.get_submodule(gate).weight.shape[0]
        except AttributeError:
            rows = None
        if rows != width:
            raise BakeError(f"{where}.site: layer {i}'s MLP has no gate projection of {adapter.mlp.size} = {width} "
                            f"rows, so units maps cannot grow every layer's MLP alike")


def bind(specs: list[Spec], model: torch.nn.Module, check_model: bool = True,
         store: TensorStore | None = None) -> Plan:
    """Bind specs to a model: `model` gives the structure, `store` the tensors (default: the model's own)."""
    store = store if store is not None else ModuleStore(model)
    adapter = adapter_for(model)
    catalog = adapter.sites(model)
    by_site: dict[str, list[Map]] = {}
    for k, spec in enumerate(specs):
        where = "spec" if len(specs) == 1 else f"spec[{k}]"
        infos = []
        for i, (site, maps) in enumerate(spec.sites):
            info = catalog.get(site)
            if info is None:
                near = [n for n in catalog if n.split(":")[0].endswith(site.split(":")[0].rsplit(".", 1)[-1])][:2]
                hint = f" (e.g. {', '.join(near)})" if near else ""
                raise BakeError(f"{where}.sites[{i}].site: {site!r} is not a site of this {adapter.family} model{hint}")
            if maps[0].units != info.units:
                raise BakeError(f"{where}.sites[{i}].maps: {maps[0].units} units, but {site} has {info.units}")
            if any(m.needs_context for m in maps):
                check_units(adapter, model, info, maps, f"{where}.sites[{i}]")
            infos.append(info)
            by_site.setdefault(site, []).extend(maps)
        if check_model:
            check_fingerprint(spec, model, infos, where, store)
    sites = [SitePlan(info, by_site[name]) for name, info in catalog.items() if name in by_site]
    return Plan(model, adapter, sites, list(specs), store)
