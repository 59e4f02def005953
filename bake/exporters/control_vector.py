"""Control vectors (`--format control-vector`): additive maps on decoder-layer outputs written as
llama.cpp's control-vector GGUF (the layout repeng writes), so that llama.cpp's
`--control-vector-scaled FILE s` applies the steering at strength λ·s, per request, on the user's own
GGUF of the unsteered model (any quantization).

An additive map y = x + λv at the residual site `<layers>.N:output` (the stream after decoder layer N,
counted from 0) is a control vector at layer N: llama.cpp's graph adds `direction.N`, times the user's
factor s, to the output of layer N (its `build_cvec` after the layer's last residual add). bake writes
direction.N = λv, so at s the runtime adds s·λv, which is the bake at strength λ·s.

llama.cpp keeps no direction for layer 0 (its vector table starts at layer 1): a map there is refused, and
so is every other map kind, any other site, and two maps at one site, each with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import BakeError

FILE = "control-vector.gguf"
ARCH = "controlvector"
SIDECAR_KEY = "bake.sidecar_of"


def directions(model: torch.nn.Module, adapter, specs) -> dict[int, np.ndarray]:
    """Layer index N → λv (float32, summed over the specs), from additive maps at layer outputs."""
    cat = adapter.sites(model)
    out: dict[int, np.ndarray] = {}
    for spec in specs:
        for name, maps in spec.sites:
            n, v = _one(cat[name], name, maps)
            out[n] = out.get(n, 0) + v
    if not out:
        raise BakeError("--format control-vector: the spec steers no site")
    return dict(sorted(out.items()))


def split(model: torch.nn.Module, adapter, specs) -> tuple[dict[int, np.ndarray], list]:
    """`--format gguf,control-vector`: (the sidecar's directions, the specs left to bake). A site at a layer
    output N ≥ 1 whose maps are one additive map, in one spec only, goes to the control vector (llama.cpp
    adds it to layer N's output, where the hooked map adds it); every other site is baked into the weights.
    Exact for every architecture, including those whose classes have no bias to fold the shift into."""
    import dataclasses
    from collections import Counter

    cat = adapter.sites(model)
    seen = Counter(name for spec in specs for name, _ in spec.sites)
    out: dict[int, np.ndarray] = {}
    rest = []
    for spec in specs:
        keep = []
        for name, maps in spec.sites:
            try:
                if name not in cat or seen[name] > 1:
                    raise BakeError(name)
                n, v = _one(cat[name], name, maps)
            except BakeError:
                keep.append((name, maps))
                continue
            out[n] = out.get(n, 0) + v
        rest.append(dataclasses.replace(spec, sites=keep))
    if not out:
        raise BakeError("--format gguf,control-vector: no site is one additive map at a layer output (from layer 1 "
                        "on), so nothing goes to the control vector: drop control-vector")
    return dict(sorted(out.items())), rest


def _one(info, name: str, maps) -> tuple[int, np.ndarray]:
    live = [m for m in maps if m.strength != 0]
    if len(live) != 1 or live[0].kind != "additive":
        kinds = ", ".join(m.kind for m in live) or "none"
        raise BakeError(f"--format control-vector: site {name}: a control vector is one additive map per layer "
                        f"output (here: {kinds}); bake it, or use --format lora for a projection")
    layer = re.fullmatch(r".*\.(\d+)", info.module)
    if info.role != "residual" or info.side != "output" or layer is None:
        raise BakeError(f"--format control-vector: site {name}: llama.cpp adds a control vector to a decoder "
                        f"layer's output only (sites <layers>.N:output, as `bake fit --method caa` fits)")
    n = int(layer.group(1))
    if n == 0:
        raise BakeError(f"--format control-vector: site {name}: llama.cpp applies control vectors from layer 1 "
                        f"on (it keeps no direction for layer 0): fit without layer 0 (--sites), or bake it")
    m = live[0]
    return n, (m.strength * m.tensors["v"].double()).float().numpy()


def write(dirs: dict[int, np.ndarray], model_hint: str, out: Path, sidecar_of: str | None = None) -> Path:
    """`out/control-vector.gguf`: arch `controlvector`, `controlvector.model_hint` and `.layer_count`, one
    float32 tensor `direction.N` per layer (the keys repeng's export_gguf writes and llama.cpp reads).
    `sidecar_of`: the steered GGUF beside it that this vector completes (`--format gguf,control-vector`),
    recorded as `bake.sidecar_of` (llama.cpp reads only the directions)."""
    from .gguf_lm import write_file

    def metadata(w) -> None:
        w.add_string(f"{ARCH}.model_hint", model_hint)
        w.add_uint32(f"{ARCH}.layer_count", len(dirs))
        if sidecar_of:
            w.add_string(SIDECAR_KEY, sidecar_of)

    target = out / FILE
    write_file(target, ARCH, metadata, {f"direction.{n}": v for n, v in dirs.items()})
    return target


def read(path: Path) -> dict[int, np.ndarray]:
    """Layer index → direction, as llama.cpp's loader reads a control-vector GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32).reshape(-1)
            for t in r.tensors if t.name.startswith("direction.")}


def sidecar(gguf_file: Path) -> Path | None:
    """The control-vector sidecar bake wrote beside the steered GGUF `gguf_file` (`--format
    gguf,control-vector`: the two run together), if there is one."""
    from .gguf_header import read as header

    path = Path(gguf_file).parent / FILE
    if not path.is_file():
        return None
    return path if header(path).fields.get(SIDECAR_KEY) == Path(gguf_file).name else None
