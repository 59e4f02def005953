"""Where each bias a fold added goes on its way to llama.cpp, decided after the passes and before any
file is written.

A fold that shifts an activation writes a bias (DESIGN.md, fold algebra); llama.cpp's loader for the
architecture may have no slot for it, and then refuses the whole file ("wrong number of tensors").
Which slots exist is asked of llama.cpp itself (`gguf_convert.refused`: a header-only GGUF of the
checkpoint with the biases added, loaded by llama.cpp) for a transformers source, and read from the
family table (`Adapter.gguf_biases`) for bake's own GGUF writer (a GGUF source). Then, per added bias:

- a slot exists: written in the GGUF;
- no slot, all zeros (a companion the bias flag turned on, as Qwen3's `attention_bias` turns on o_proj's
  with q/k/v's): left out, exactly (llama.cpp adds no bias there);
- anything else: refused, naming the architecture and the tensor; for the bias of a layer's last writer to
  the stream (a shift at the layer's output, N ≥ 1) the message offers `--format gguf,control-vector`,
  which takes such shifts out of the bake into llama.cpp's control-vector sidecar
  (`control_vector.split`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BakeError


@dataclass
class Layout:
    drop: set[str] = field(default_factory=set)  # checkpoint tensors left out of the GGUF (zeros without a slot)


def source_biases(folder: Path) -> set[str]:
    """The bias tensors in a checkpoint directory's safetensors files."""
    from safetensors import safe_open

    names = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= {k for k in h.keys() if k.endswith(".bias")}
    return names


def residual_writers(model: torch.nn.Module, adapter) -> dict[str, tuple[int, float]]:
    """`<layers>.N.<writer>.bias` → (N, c): the bias of each layer's last writer to the stream, and the
    factor the stream adds its output with."""
    out = {}
    for info in adapter.sites(model).values():
        m = re.fullmatch(r".*\.(\d+)", info.module)
        if info.role == "residual" and info.side == "output" and info.writer and m:
            out[f"{info.writer}.bias"] = (int(m.group(1)), float(info.writer_scale))
    return out


def layout(model: torch.nn.Module, adapter, source_dir: Path, refused, arch: str, flag: str = "--format gguf",
           tensors=None) -> Layout:
    """The Layout of the baked `model`'s biases that `source_dir`'s checkpoint lacks. `refused(added)`
    (name → shape) names those llama.cpp's `arch` loader has no slot for. `tensors`: name → tensor of the
    baked weights where the model holds none (a streamed bake: its written checkpoint)."""
    state = tensors if tensors is not None else model.state_dict()
    added = {n: state[n] for n in sorted(set(state) - source_biases(source_dir)) if n.endswith(".bias")}
    bad = refused({n: tuple(t.shape) for n, t in added.items()}) if added else []
    zero = {n for n in bad if not bool(added[n].any())}
    bad = [n for n in bad if n not in zero]
    if bad:
        raise BakeError(_refusal(bad, residual_writers(model, adapter), arch, flag))
    return Layout(drop=zero)


def written_biases(folder: Path) -> dict[str, torch.Tensor]:
    """The bias tensors of a checkpoint directory, read (biases are small; a streamed bake's weights stay
    on disk)."""
    from safetensors import safe_open

    out = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith(".bias")})
    return out


def _refusal(bad: list[str], writers: dict, arch: str, flag: str) -> str:
    """One line: the first tensor llama.cpp cannot hold, and the way out where there is one."""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    head = (f"{flag}: llama.cpp's {arch} loader has no slot for {bad[0]}{more}, a bias a fold added (a shift; it "
            f"would refuse the file: \"wrong number of tensors\")")
    if all(n in writers and writers[n][0] >= 1 for n in bad):
        return head + "; it is a shift at the layer's output: --format gguf,control-vector writes such shifts as " \
                      "llama.cpp's control-vector sidecar, exactly"
    return head + "; steer with maps that fold into weights (projections, scales), or a model whose llama.cpp " \
                  "architecture reads that bias"
