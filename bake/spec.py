"""The intervention spec format: a versioned JSON manifest plus one safetensors file beside it.

```json
{"format": "bake-spec", "version": 1,
 "method": "mean-act", "params": {...}, "provenance": {...},
 "model": {"architecture": ..., "model_type": ..., "shapes": {...}, "weights_sha256": ...},
 "tensors": "detox.safetensors",
 "sites": [{"site": "model.layers.3.input_layernorm:output",
            "maps": [{"kind": "affine", "strength": 0.5, "tensors": {"a": "t0", "b": "t1"}}]}]}
```
Tensor names in the manifest refer to entries of the safetensors file; every entry must be
referenced, and the file must sit in the manifest's own directory. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BakeError
from .maps import KINDS, Map

FORMAT = "bake-spec"
VERSION = 1
TOP_KEYS = {"format", "version", "method", "params", "provenance", "model", "tensors", "sites"}
MAP_KEYS = {"kind", "strength", "tensors", "inner"}


@dataclass
class Spec:
    sites: list[tuple[str, list[Map]]]
    method: str = "manual"
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    path: Path | None = None  # where it was read from
    tensors_path: Path | None = None  # the tensor file the manifest names (set by read and write)

    @property
    def site_names(self) -> list[str]:
        return [s for s, _ in self.sites]

    def with_strength(self, strength: float) -> Spec:
        sites = [(s, [m.with_strength(strength) for m in maps]) for s, maps in self.sites]
        return Spec(sites, self.method, self.params, self.provenance, self.model, self.path, self.tensors_path)

    def sha256(self) -> str:
        """Hash of the manifest and of the tensor file it names (as written): identifies the spec in model
        cards and reports."""
        if self.path is None:
            raise ValueError("spec has not been written")
        h = hashlib.sha256(self.path.read_bytes())
        h.update((self.tensors_path or self.path.parent / tensors_name(self.path)).read_bytes())
        return h.hexdigest()


def tensors_name(manifest: Path) -> str:
    return manifest.with_suffix(".safetensors").name


def _fail(msg: str) -> BakeError:
    return BakeError(msg)


def check_strength(value, where: str) -> float:
    """A strength λ as a float: a finite number (not a bool, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{where}: must be a finite number, got {_short(value)}")
    try:
        lam = float(value)
    except OverflowError:
        raise _fail(f"{where}: must be a finite number, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(lam):
        raise _fail(f"{where}: must be a finite number, got {lam!r}")
    return lam


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise _fail(f"spec: the key {dup!r} appears twice in one JSON object")
    return dict(pairs)


def _load_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers past Python's digit limit
        raise _fail(f"spec: {path.name} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:
        raise _fail(f"spec: {path.name} nests JSON too deeply to read") from None
    if not isinstance(doc, dict):
        raise _fail("spec: the manifest must be a JSON object")
    return doc


MODEL_FIELDS = {"architecture": str, "model_type": str, "shapes": dict, "weights_sha256": str, "weights_digest": str}
TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_model_block(model: dict) -> None:
    """spec.model: the fingerprint's fields, each of its type (shapes: names to integers)."""
    for key, val in model.items():
        want = MODEL_FIELDS.get(key)
        if want is None:
            raise _fail(f"spec.model: unknown field {key!r} (known: {', '.join(MODEL_FIELDS)})")
        if not isinstance(val, want):
            raise _fail(f"spec.model.{key}: must be a {want.__name__}, got {type(val).__name__}")
    for key, val in model.get("shapes", {}).items():
        if isinstance(val, bool) or not isinstance(val, int):
            raise _fail(f"spec.model.shapes.{key}: must be an integer, got {_short(val)}")


def _tensor_file(path: Path, tname) -> Path:
    """The tensor file a manifest names: a plain name in the manifest's own directory, resolving there."""
    if not isinstance(tname, str) or not tname or os.path.basename(tname) != tname or tname in (".", ".."):
        raise _fail(f"spec.tensors: must name a file in the spec's own directory, got {tname!r}")
    tpath = path.parent / tname
    if not tpath.is_file():
        raise _fail(f"spec.tensors: tensor file {tname!r} not found beside {path.name}")
    if tpath.resolve().parent != path.parent.resolve():
        raise _fail(f"spec.tensors: {tname!r} is a link to a file outside the spec's directory "
                    f"({tpath.resolve()}); copy the file beside the spec")
    return tpath


def _map_from_json(obj, where: str, tensors: dict[str, torch.Tensor], used: set[str]) -> Map:
    if not isinstance(obj, dict):
        raise _fail(f"{where}: must be an object")
    extra = set(obj) - MAP_KEYS
    if extra:
        raise _fail(f"{where}: unknown field(s) {sorted(extra)}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise _fail(f"{where}.kind: unknown map kind {kind!r} (known: {', '.join(KINDS)})")
    strength = check_strength(obj.get("strength", 1.0), f"{where}.strength")
    refs = obj.get("tensors")
    if not isinstance(refs, dict) or not all(isinstance(v, str) for v in refs.values()):
        raise _fail(f"{where}.tensors: must map tensor roles to names in the tensor file")
    ts = {}
    for role, name in refs.items():
        if name not in tensors:
            raise _fail(f"{where}.tensors.{role}: tensor {name!r} is not in the tensor file")
        used.add(name)
        ts[role] = tensors[name]
    inner = None
    if "inner" in obj:
        inner = _map_from_json(obj["inner"], f"{where}.inner", tensors, used)
    m = Map(kind, strength, ts, inner)
    m.validate(where)
    return m


def _check_finite(obj, where: str) -> None:
    """No NaN or infinity anywhere in a JSON block (Python's reader accepts them; strict JSON does not)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise _fail(f"{where}: {obj} is not a finite number")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        _check_finite(v, f"{where}.{k}" if isinstance(obj, dict) else f"{where}[{k}]")


def read(path: str | os.PathLike) -> Spec:
    """Read and validate a spec; every problem raises BakeError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"spec: no such file {str(path)!r}")
    doc = _load_json(path)
    if doc.get("format") != FORMAT:
        raise _fail(f"spec.format: expected {FORMAT!r}, got {_short(doc.get('format'))}")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise _fail(f"spec.version: this bake reads version {VERSION} (an integer), got {_short(version)}")
    extra = set(doc) - TOP_KEYS
    if extra:
        raise _fail(f"spec: unknown field(s) {sorted(extra)}")
    for key in ("params", "provenance", "model"):
        if not isinstance(doc.get(key, {}), dict):
            raise _fail(f"spec.{key}: must be an object")
        _check_finite(doc.get(key, {}), f"spec.{key}")
    _check_model_block(doc.get("model", {}))
    tname = doc.get("tensors")
    tpath = _tensor_file(path, tname)
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(f"spec.tensors: {tname} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    for name, t in tensors.items():
        if t.dtype not in TENSOR_DTYPES:
            raise _fail(f"spec.tensors: tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')} (a spec "
                        f"holds float16, bfloat16, float32 or float64 tensors)")
    sites_json = doc.get("sites")
    if not isinstance(sites_json, list) or not sites_json:
        raise _fail("spec.sites: must be a non-empty list")
    used: set[str] = set()
    sites: list[tuple[str, list[Map]]] = []
    seen = set()
    for i, entry in enumerate(sites_json):
        where = f"spec.sites[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"site", "maps"}:
            raise _fail(f"{where}: must be an object with exactly 'site' and 'maps'")
        site = entry["site"]
        if not isinstance(site, str) or not (site.endswith(":input") or site.endswith(":output")):
            raise _fail(f"{where}.site: must be 'module.path:input' or 'module.path:output', got {site!r}")
        if site in seen:
            raise _fail(f"{where}.site: {site!r} appears twice (list its maps in order in one entry)")
        seen.add(site)
        maps_json = entry["maps"]
        if not isinstance(maps_json, list) or not maps_json:
            raise _fail(f"{where}.maps: must be a non-empty list")
        maps = [_map_from_json(m, f"{where}.maps[{j}]", tensors, used) for j, m in enumerate(maps_json)]
        units = {m.units for m in maps}
        if len(units) != 1:
            raise _fail(f"{where}.maps: maps at one site disagree on the unit count {sorted(units)}")
        sites.append((site, maps))
    unused = set(tensors) - used
    if unused:
        raise _fail(f"spec.tensors: tensor file holds unreferenced tensor(s) {sorted(unused)[:5]}")
    return Spec(sites, str(doc.get("method", "manual")), doc.get("params", {}), doc.get("provenance", {}),
                doc.get("model", {}), path, tpath)


def write(spec: Spec, path: str | os.PathLike) -> Path:
    """Write manifest and tensors (each via a temp file renamed into place)."""
    path = Path(path)
    if path.suffix != ".json":
        raise BakeError(f"--out: a spec manifest ends in .json, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    def enc(m: Map, prefix: str) -> dict:
        obj = {"kind": m.kind, "strength": m.strength, "tensors": {}}
        for role, t in m.tensors.items():
            name = f"{prefix}.{role}"
            tensors[name] = t.detach().to(torch.float32).cpu().clone().contiguous()  # no shared storage
            obj["tensors"][role] = name
        if m.inner is not None:
            obj["inner"] = enc(m.inner, prefix + ".inner")
        return obj

    sites = []
    for i, (site, maps) in enumerate(spec.sites):
        sites.append({"site": site, "maps": [enc(m, f"s{i}.m{j}") for j, m in enumerate(maps)]})
    tname = tensors_name(path)
    doc = {"format": FORMAT, "version": VERSION, "method": spec.method, "params": spec.params,
           "provenance": spec.provenance, "model": spec.model, "tensors": tname, "sites": sites}
    try:
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"  # strict JSON: NaN is no number a reader takes
    except ValueError:
        raise BakeError(f"spec {path.name}: params or provenance hold a NaN or infinite number; not written") from None
    tmp_t = path.parent / f".{tname}.tmp"
    tmp_j = path.parent / f".{path.name}.tmp"
    try:
        save_file(tensors, str(tmp_t), metadata={"format": FORMAT})
        tmp_j.write_text(text, encoding="utf-8")
        for p in (tmp_t, tmp_j):
            os.chmod(p, 0o644)
        os.replace(tmp_t, path.parent / tname)
        os.replace(tmp_j, path)
    finally:
        for p in (tmp_t, tmp_j):
            if p.exists():
                p.unlink()
    spec.path, spec.tensors_path = path, path.parent / tname
    return path


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
