"""`bake families`: which families bake supports and, per site preset and map kind, how a map
folds there: into the stock class and config, with a bias flag turned on, by relabelling the
checkpoint to another family's class, or only as an inserted module.

The table is computed, not written by hand: each cell runs the compiler's passes on a two-layer
random model of the family with a map of that kind at every site of the preset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BakeError
from .maps import MAP_KINDS, Map
from .families import FAMILIES as ADAPTERS
from .families import Adapter
from .plan import bind
from .spec import Spec

KINDS = ("scale", "affine", "additive", "projection")
ALWAYS_INSERTED = ("affine with support", "monotone-pwl", "gated")


@dataclass
class Cell:
    outcome: str  # stock | flag | relabel | insert
    detail: str = ""

    def text(self) -> str:
        return {"stock": "stock", "flag": f"stock + {self.detail}", "relabel": f"relabel → {self.detail}",
                "insert": "inserted module", "none": "(no such site)"}[self.outcome]


def probe_map(kind: str, units: int, gen: torch.Generator) -> Map:
    """The registered kind's probe example (MapKind.example: a = 1 + 0.5·u, b = 0.1 + u′, U a random
    unit vector); "scale" is the affine probe with its shift dropped (a⊙x, b = 0)."""
    if kind == "scale":
        a = MAP_KINDS["affine"].example(units, gen).tensors["a"]
        return Map("affine", 1.0, {"a": a, "b": torch.zeros(units)})
    return MAP_KINDS[kind].example(units, gen)


def weights_only_spec(model: torch.nn.Module, seed: int, scale_sd: float = 0.3) -> Spec:
    """A random spec every architecture holds without a bias: a rank-1 projection (λ = 0.8) at every
    attention and MLP write, and a per-unit scale a = 1 + scale_sd·N(0, 1) at every MLP's hidden units
    where the family has them; fingerprinted for `model`. The GGUF tests and benchmarks bake it."""
    from .families import adapter_for
    from .models import fingerprint

    g = torch.Generator().manual_seed(seed)
    adapter = adapter_for(model)
    cat = adapter.sites(model)
    sites = []
    for name in adapter.resolve(model, ["attn-out", "mlp-out"]):
        u = torch.randn(cat[name].units, 1, generator=g)
        sites.append((name, [Map("projection", 0.8, {"U": u / u.norm()})]))
    for name in adapter.resolve(model, ["mlp-in"]) if "mlp-in" in adapter.offered(model) else []:
        a = 1 + scale_sd * torch.randn(cat[name].units, generator=g)
        sites.append((name, [Map("affine", 1.0, {"a": a, "b": torch.zeros_like(a)})]))
    spec = Spec(sites, method="random")
    spec.model = fingerprint(model, [cat[s] for s, _ in sites])
    return spec


def cell(adapter: Adapter, preset: str, kind: str, variant: str | None = None, make=None) -> Cell:
    """Compile a map of `kind` at every site of `preset` into a fresh tiny model of the family (`make()`
    where given: a copy of a tiny model of a probed type)."""
    from . import passes

    torch.manual_seed(0)
    model = make() if make else adapter.tiny(variant) if variant else adapter.tiny()
    catalog = adapter.sites(model)
    gen = torch.Generator().manual_seed(0)
    try:
        sites = adapter.resolve(model, [preset])
    except BakeError:
        return Cell("none")
    spec = Spec([(s, [probe_map(kind, catalog[s].units, gen)]) for s in sites], method="probe")
    try:
        plan = passes.run(bind([spec], model, check_model=False))
    except BakeError:
        return Cell("insert")
    changes = plan.config_changes
    if "architectures" in changes:
        flags = ", ".join(sorted(k for k in changes if k.endswith("_bias")))
        return Cell("relabel", f"{changes['model_type']} + {flags}")
    if changes:
        return Cell("flag", ", ".join(sorted(changes)))
    return Cell("stock")


def table(families: list[str] | None = None) -> list[dict]:
    """One row per (family, preset): the outcome per map kind."""
    known = {a.family: a for a in ADAPTERS}
    for f in families or []:
        if f not in known:
            raise BakeError(f"--family: unknown family {f!r} (known: {', '.join(known)})")
    rows = []
    for fam in families or list(known):
        ad = known[fam]
        for variant in getattr(ad, "variants", (None,)):
            label = f"{fam}:{variant}" if variant else fam
            for preset in ad.presets:
                row = {"family": label, "model_types": list(ad.model_types), "preset": preset}
                for kind in KINDS:
                    row[kind] = cell(ad, preset, kind, variant).text()
                rows.append(row)
    return rows


def probed_table(model_type: str) -> list[dict]:
    """The same rows for any causal-LM model type, on its tiny random model and the family bake's probe
    derives from it (`bake families --type`); a table family's own table where it has one."""
    import copy

    from .families import adapter_for
    from .families.tiny import build

    try:
        model = build(model_type)
    except BakeError:
        raise  # an unknown type: its own message
    except Exception as e:  # noqa: BLE001 - the config class or its model does not build small
        raise BakeError(f"--type: {model_type}: no tiny model builds ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from e
    ad = adapter_for(model)
    rows = []
    for preset in ad.presets:
        row = {"family": f"{model_type} ({'probe' if ad.about.startswith('derived') else ad.family})",
               "model_types": [model_type], "preset": preset}
        for kind in KINDS:
            row[kind] = cell(ad, preset, kind, make=lambda: copy.deepcopy(model)).text()
        rows.append(row)
    return rows


GGUF_SLOTS = "gguf_slots.json"  # in bake/data: llama.cpp's bias slots per model type (benchmarks/gguf_slots.py)


def gguf_line(model_types) -> str:
    """How a family reaches llama.cpp: per model type, the architecture its converter writes and the bias
    slots llama.cpp's loader has (asked of llama.cpp by benchmarks/gguf_slots.py), or why no GGUF."""
    import json
    from importlib.resources import files

    rows = json.loads(files("bake.data").joinpath(GGUF_SLOTS).read_text())["types"]
    out = []
    for t in model_types:
        r = rows.get(t)
        if r is None:
            out.append(f"{t}: not probed")
        elif not r["gguf"]:
            out.append(f"{t}: no GGUF from a directory ({r['why']})")
        else:
            slots = ", ".join(r["bias_slots"]) or "none a fold adds (every Linear has its bias)"
            none = f"; no slot for {', '.join(r['no_slot'])} (zeros left out, shifts refused)" if r["no_slot"] else ""
            tok = f" (with SmolLM2's tokenizer: {r['tokenizer']})" if r.get("tokenizer") else ""
            out.append(f"{t}: llama.cpp {r['arch']}, bias slots {slots}{none}{tok}")
    return "; ".join(out)


SWEEP = "families_sweep.json"  # in bake/data: the last sweep over every model type (benchmarks/families_sweep.py)


def sweep_verdicts() -> tuple[str, list[dict]]:
    """(transformers version, rows) of the shipped sweep: per model type, its status and the reason."""
    import json
    from importlib import resources

    doc = json.loads(resources.files("bake").joinpath("data", SWEEP).read_text(encoding="utf-8"))
    return doc["transformers"], doc["rows"]
