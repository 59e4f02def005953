"""An importance matrix for llama.cpp's quantizer (`--imatrix`), passed through llama-cpp-python's
`llama_model_quantize_params.imatrix` (a NULL-terminated array of {name, data, size}, llama.h).

llama.cpp's definition (its `llama-imatrix` tool): for each weight matrix W [out, in] of the GGUF, the
mean over calibration tokens of the squared input, m_j = E[x_j²] (j < in); the quantizer weighs each
column's rounding error by m_j. Two sources:

- a text file (one calibration text per line, or blank-line separated paragraphs): bake runs the *baked*
  model (float32, PyTorch) over it with forward pre-hooks on every `nn.Linear`, so the matrix measures the
  steered activations the quantized model will see; HF module names become GGUF tensor names through the
  gguf package's tensor-name map for the architecture written;
- a `.gguf` importance matrix written by llama.cpp's `llama-imatrix` (`<tensor>.in_sum2` and
  `<tensor>.counts`: m = in_sum2 / counts, per expert for a merged MoE tensor).

Types whose quantization needs one (IQ1_S/M, IQ2_XXS/XS/S/M, IQ3_XXS, Q2_K_S: llama-quant.cpp's
`tensor_requires_imatrix`) are refused without it, before any work."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from ..errors import BakeError

NEEDS = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "q2_k_s")


def check(kind: str, imatrix: str | None) -> None:
    """Before any work: a type that needs an importance matrix has one, and the file is readable."""
    if kind in NEEDS and not imatrix:
        raise BakeError(f"--gguf-type {kind}: llama.cpp quantizes it only with an importance matrix: --imatrix "
                        f"TEXTS.txt (bake measures it on the steered model) or --imatrix FILE.gguf (llama-imatrix's)")
    if imatrix and not Path(imatrix).is_file():
        raise BakeError(f"--imatrix: {imatrix!r} is not a file")
    if imatrix and Path(imatrix).suffix == ".gguf":
        read_gguf(Path(imatrix))


def texts(path: Path) -> list[str]:
    """Calibration texts: paragraphs separated by blank lines, else one per line."""
    raw = Path(path).read_text(encoding="utf-8")
    parts = [p.strip() for p in raw.split("\n\n")] if "\n\n" in raw else [ln.strip() for ln in raw.splitlines()]
    parts = [p for p in parts if p]
    if not parts:
        raise BakeError(f"--imatrix: {str(path)!r} holds no text")
    return parts


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer, calib: list[str], names: dict[str, str],
            max_tokens: int = 512) -> tuple[dict[str, np.ndarray], int]:
    """(GGUF tensor name → E[x²] at the input of each `nn.Linear` named in `names` (HF module → GGUF
    tensor), the number of tokens) over `calib` (each text cut at `max_tokens`)."""
    from tqdm import tqdm

    sums: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []
    for mod_name, gguf_name in names.items():
        def hook(mod, args, key=gguf_name):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        hooks.append(model.get_submodule(mod_name).register_forward_pre_hook(hook))
    try:
        for t in tqdm(calib, desc="importance matrix", leave=False):
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
            model(input_ids=ids.to(model.device))
            count[0] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / max(count[0], 1)).float().numpy() for k, v in sums.items()}, count[0]


def linear_names(model: torch.nn.Module, arch: str) -> dict[str, str]:
    """HF module name → GGUF tensor name for every `nn.Linear` the gguf package's map names for `arch`
    (llama.cpp's architecture name)."""
    import gguf

    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, model.config.num_hidden_layers)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            new = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if new:
                out[name] = new
    return out


def read_gguf(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's GGUF: tensor name → in_sum2 / counts (flattened over experts)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises several kinds for a bad file
        raise BakeError(f"--imatrix: cannot read {str(path)!r} as GGUF: {e}") from None
    t = {x.name: np.array(x.data, dtype=np.float32) for x in r.tensors}
    out = {}
    for name, s2 in t.items():
        if name.endswith(".in_sum2") and name[:-8] + ".counts" in t:
            counts = t[name[:-8] + ".counts"].reshape(-1)
            rows = s2.reshape(len(counts), -1)
            out[name[:-8]] = (rows / np.maximum(counts, 1)[:, None]).reshape(-1)
    if not out:
        raise BakeError(f"--imatrix: {str(path)!r} holds no importance matrix (<tensor>.in_sum2 and .counts)")
    return out


def as_param(imatrix: dict[str, np.ndarray]):
    """The NULL-terminated `llama_model_imatrix_data` array llama_model_quantize reads, and the buffers it
    points into (keep both alive while the quantizer runs)."""
    import llama_cpp

    keep = [(k.encode(), np.ascontiguousarray(v, dtype=np.float32)) for k, v in imatrix.items()]
    arr = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for i, (name, data) in enumerate(keep):
        arr[i].name = name
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(keep)].name = None
    return arr, keep


FILE = "imatrix.gguf"


def write(imatrix: dict[str, np.ndarray], out: Path, tokens: int) -> Path:
    """`out/imatrix.gguf` in llama-imatrix's layout (`<tensor>.in_sum2` = m·tokens, `<tensor>.counts`), beside
    the GGUF it quantized: `bake verify` quantizes the unsteered model with it, and llama.cpp's tools read it."""
    from .gguf_lm import write_file

    arrays = {}
    for name, m in imatrix.items():
        arrays[f"{name}.in_sum2"] = np.asarray(m, np.float32) * tokens
        arrays[f"{name}.counts"] = np.array([tokens], np.float32)
    target = Path(out) / FILE
    write_file(target, "imatrix", lambda w: w.add_string("general.type", "imatrix"), arrays)
    return target


def beside(gguf_file: Path) -> dict[str, np.ndarray] | None:
    """The importance matrix bake wrote beside a quantized GGUF, if any."""
    path = Path(gguf_file).parent / FILE
    return read_gguf(path) if path.is_file() else None
