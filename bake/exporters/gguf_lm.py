"""GGUF for llama.cpp and Ollama: the baked float checkpoint written in the source GGUF's architecture,
with the source's metadata carried over (tokenizer, merges, chat template, hyperparameters), then
quantized by llama.cpp itself (`llama_model_quantize`, through llama-cpp-python) to the requested type.

Tensor names come from the `gguf` package's map for the architecture; for llama.cpp's `llama`
architecture (rotary type NORM) the q and k weights (and biases) are permuted from transformers'
rotary layout to llama.cpp's, as llama.cpp's own converter does (transformers' GGUF reader undoes it);
NEOX-rotary architectures (qwen2) keep transformers' layout. The architecture written is the baked
checkpoint's: a Qwen2 relabelled as Llama by a fold that needed biases Qwen2's class lacks is written
as `llama` (the source's hyperparameter keys renamed), where llama.cpp's loader reads those biases.
A tensor the architecture's llama.cpp loader has no slot for (a bias it does not read) is refused before
any work (llama.cpp would refuse the file: "wrong number of tensors"). The types llama.cpp actually
wrote are read back from the file (`tensor_types`): its quantizer falls back to another type for rows
whose width the requested one cannot hold."""

from __future__ import annotations

import errno
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import BakeError

# llama.cpp's llama_ftype for each --gguf-type (llama.h); the quantizer accepts these targets
TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11,
         "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
         "iq2_xxs": 19, "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25,
         "iq3_s": 26, "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31, "bf16": 32}
NAMES = {v: k for k, v in TYPES.items()}
ROTARY_PERMUTED = ("llama",)  # llama.cpp architectures whose converter permutes q/k (rotary type NORM)


def source_gguf(model_dir: Path, flag: str = "--format gguf") -> Path | None:
    """The GGUF a converted model directory came from (bake_source.json), if any: recorded by absolute
    path, size and sha256, and refused (naming bake_source.json) when the file there is no longer it."""
    from ..models.loading import check_source

    return check_source(Path(model_dir), flag)


def _field(path: Path, key: str, default):
    """One scalar metadata value of a GGUF file (`default` where it has none)."""
    from .gguf_header import read

    value = read(path).fields.get(key)
    return value if value is not None else default


def arch_of(path: Path) -> str:
    """A GGUF file's llama.cpp architecture."""
    return str(_field(path, "general.architecture", "?"))


def converts(model_dir: Path, adapter) -> bool:
    """llama.cpp's converter writes the GGUF: from a transformers directory, and from a GGUF source of a
    family bake's own writer does not know (its tokenizer metadata carried over); bake's writer: a GGUF
    source of Llama or Qwen2."""
    return source_gguf(model_dir) is None or adapter is None or adapter.gguf_arch is None


def written_arch(model: torch.nn.Module, adapter, model_dir: Path) -> str:
    """The llama.cpp architecture the baked `model` is written as."""
    from . import gguf_convert

    if not converts(model_dir, adapter):
        return written_as(adapter, model.config).gguf_arch
    return gguf_convert.arch_name(gguf_convert.model_class(Path(model_dir), hp=model.config.to_dict())[0])


def arch_for(adapter, model_dir: Path) -> str:
    """The llama.cpp architecture the unsteered model is written as: the family's for a GGUF source, the
    converter's for a transformers directory."""
    from . import gguf_convert

    if not converts(model_dir, adapter):
        return adapter.gguf_arch
    return gguf_convert.arch_name(gguf_convert.model_class(Path(model_dir))[0])


def file_type(path: Path) -> str:
    """The --gguf-type name of a GGUF file's general.file_type."""
    return NAMES.get(int(_field(path, "general.file_type", 0)), "f16")


def check_supported(model: torch.nn.Module, adapter, model_dir: Path, gguf_type: str | None,
                    flag: str = "--format gguf", imatrix: str | None = None) -> str:
    """Refuse before any work what llama.cpp cannot run as written; returns the type to write (default: a
    GGUF source's own type, f16 from a directory). A GGUF source of Llama or Qwen2: bake's writer, the
    source's metadata carried over; anything else: llama.cpp's own converter (`gguf_convert`), a GGUF
    source's tokenizer metadata carried over."""
    src = source_gguf(model_dir)
    if converts(model_dir, adapter):  # also a control vector's unsteered GGUF
        from . import gguf_convert

        kind = gguf_type or (file_type(src) if src else "f16")
        if kind not in TYPES:
            raise BakeError(f"--gguf-type: unknown type {kind!r} (known: {', '.join(TYPES)})")
        gguf_convert.check(Path(model_dir), flag, vocab_from=src)
        llama_cpp()  # quantized and verified in llama.cpp
        from .gguf_imatrix import check as check_imatrix

        check_imatrix(kind, imatrix)
        return kind
    kind = gguf_type or file_type(src)
    if kind not in TYPES:
        raise BakeError(f"--gguf-type: unknown type {kind!r} (known: {', '.join(TYPES)})")
    if kind != "f32":
        llama_cpp()
    from .gguf_imatrix import check as check_imatrix

    check_imatrix(kind, imatrix)
    check_slots(model, adapter, flag)
    return kind


def check_slots(model: torch.nn.Module, adapter, flag: str = "--format gguf") -> None:
    """Before any work: every tensor of the model has a slot in llama.cpp's loader for the architecture
    (the biases a fold may add are the ones bake's GGUF families read; `write` checks the baked tensors
    again)."""
    names = [k for k in model.state_dict() if not (k == "lm_head.weight"
                                                   and getattr(model.config, "tie_word_embeddings", False))]
    gguf_names(names, adapter, model.config, flag)


def gguf_names(names, adapter, cfg, flag: str = "--format gguf") -> dict[str, str]:
    """HF name → GGUF name for the architecture; a BakeError naming the first tensor llama.cpp's loader
    has no slot for (it would refuse the whole file: "wrong number of tensors")."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, adapter.gguf_arch.upper())
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out = {}
    for name in names:
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None or (name.endswith(".bias") and new.rsplit(".", 2)[-2] not in adapter.gguf_biases):
            raise BakeError(f"{flag}: llama.cpp's {adapter.gguf_arch} loader has no slot for {name}: it would "
                            f"refuse the file (\"wrong number of tensors\"; biases it reads: "
                            f"{', '.join(adapter.gguf_biases)})")
        out[name] = new
    return out


def llama_cpp(flag: str = "--format gguf"):
    try:
        import llama_cpp
    except ImportError as e:
        raise BakeError(f"{flag}: quantizing and verifying run llama.cpp itself: pip install "
                        "llama-cpp-python (it builds llama.cpp from source)") from e
    return llama_cpp


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary layout → llama.cpp's (convert_hf_to_gguf.LlamaModel.permute), weights or biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: dict[str, torch.Tensor], adapter, cfg) -> dict[str, np.ndarray]:
    """HF names → GGUF names (float32), permuted where the architecture needs it; refused if llama.cpp's
    loader has no slot for a tensor."""
    heads = {f".{m}.": n for m, n in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads))
             } if adapter.gguf_arch in ROTARY_PERMUTED else {}
    names = gguf_names(tensors, adapter, cfg)
    out = {}
    for name, t in tensors.items():
        new = names[name]
        a = t.float().numpy()
        n = next((v for k, v in heads.items() if k in f".{name}"), None)
        out[new] = permute(a, n) if n else a
    return out


def write(ckpt: Path, model_dir: Path, out: Path, kind: str, adapter, log=print, drop=(), imatrix=None) -> Path:
    """model-<TYPE>.gguf in `out` from the checkpoint in `ckpt` (safetensors), without the tensors in `drop`
    (`gguf_biases.layout`): with the source GGUF's metadata where the source is a GGUF, else by llama.cpp's
    own converter."""
    if converts(model_dir, adapter):
        return _converted(Path(ckpt), Path(model_dir), Path(out), kind, log, drop, imatrix)
    import gguf
    from safetensors import safe_open

    from transformers import AutoConfig

    src = gguf.GGUFReader(str(source_gguf(model_dir)))
    cfg = AutoConfig.from_pretrained(str(ckpt))
    adapter = written_as(adapter, cfg)
    tensors = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys() if k not in drop})
    arrays = gguf_tensors(tensors, adapter, cfg)
    target = out / f"model-{kind.upper()}.gguf"
    f32 = target if kind == "f32" else out / "model-F32.tmp.gguf"
    arch, src_arch = adapter.gguf_arch, src.fields["general.architecture"].contents()

    def metadata(w) -> None:
        for key, field in src.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            if key.startswith(f"{src_arch}."):  # the hyperparameters, under the architecture written
                key = arch + key[len(src_arch):]
            value = field.contents()
            if key == f"{arch}.feed_forward_length":  # the baked width: a grown MLP (units maps) is wider
                value = cfg.intermediate_size
            w.add_key_value(key, value, field.types[0], sub_type=sub)
        w.add_file_type(TYPES["f32"])

    write_file(f32, arch, metadata, arrays)
    if kind != "f32":
        quantize(f32, target, kind, imatrix)
        f32.unlink()
    return _logged(target, kind, f"llama.cpp {arch}", log)


def _logged(target: Path, kind: str, how: str, log) -> Path:
    """Say what was written: the tensor types read back from the file, and a note on a fallback."""
    types = tensor_types(target)
    log(f"  gguf                   {target.name}: {sum(types.values())} tensors, {kind} ({how}); written as "
        f"{summary(types)}")
    fell = fallback(kind, types)
    if fell:
        log(f"  gguf                   note: {fell}")
    return target


def _converted(ckpt: Path, source: Path, out: Path, kind: str, log, drop=(), imatrix=None) -> Path:
    """llama.cpp's converter writes the checkpoint (at `kind` where it can, else f32 for the quantizer);
    what llama.cpp's loader has no slot for was settled before the bake (`bias_layout`)."""
    from . import gguf_convert

    target = out / f"model-{kind.upper()}.gguf"
    direct = kind in gguf_convert.DIRECT
    first = target if direct else out / "model-F32.tmp.gguf"
    gguf_convert.convert(ckpt, first, kind if direct else "f32", drop=drop, vocab=source,
                         vocab_from=source_gguf(source))
    arch = _field(first, "general.architecture", "?")
    if not direct:
        quantize(first, target, kind, imatrix)
        first.unlink()
    return _logged(target, kind, f"llama.cpp {arch}, by llama.cpp's converter", log)


def bias_layout(model: torch.nn.Module, adapter, model_dir: Path, flag: str = "--format gguf", written=None):
    """Where the biases the folds added to `model` go (`gguf_biases.Layout`): asked of llama.cpp's loader
    for a transformers source, of the family table for a GGUF source (bake's own writer). `written`: the
    baked checkpoint's directory where `model` holds no weights (a streamed bake)."""
    from . import gguf_biases, gguf_convert

    if converts(model_dir, adapter):
        hp = model.config.to_dict()
        arch = gguf_convert.arch_name(gguf_convert.model_class(Path(model_dir), flag, hp)[0])
        src = source_gguf(model_dir)
        refused = lambda added: gguf_convert.refused(Path(model_dir), hp, added, flag, src)  # noqa: E731
    else:
        family = written_as(adapter, model.config)
        arch = family.gguf_arch
        refused = lambda added: [n for n in added if not _has_slot(n, family, model.config)]  # noqa: E731
    tensors = gguf_biases.written_biases(Path(written)) if written is not None else None
    return gguf_biases.layout(model, adapter, Path(model_dir), refused, arch, flag, tensors)


def _has_slot(name: str, adapter, cfg) -> bool:
    """bake's own writer: llama.cpp's loader for the family's architecture reads this bias."""
    try:
        gguf_names([name], adapter, cfg)
    except BakeError:
        return False
    return True


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the GGUF file holds (read back from the file), most first."""
    from .gguf_header import read

    counts = Counter(kind for _, kind in read(path).tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summary(types: dict[str, int]) -> str:
    """`Q4_K ×12, F32 ×5` for a tensor_types dict."""
    return ", ".join(f"{k} ×{n}" for k, n in types.items())


def main_type(kind: str) -> str:
    """The ggml type a --gguf-type writes its matrices in (q4_k_m → Q4_K, q8_0 → Q8_0, bf16 → BF16)."""
    up = kind.upper()
    return up.rsplit("_", 1)[0] if "_K_" in up else up


def fallback(kind: str, types: dict[str, int]) -> str | None:
    """A note when llama.cpp wrote no tensor of the type asked for (its quantizer falls back to another
    type when a row's width is not a multiple of the type's block), else None."""
    want = main_type(kind)
    if kind == "f32" or want in types:
        return None
    return (f"llama.cpp wrote no {want} tensor for --gguf-type {kind} (the rows are too narrow for its blocks; "
            f"it fell back to {summary(types)}); the file name keeps the type asked for")


def written_as(adapter, cfg):
    """The family whose GGUF architecture the baked checkpoint is: the relabel target's when a fold
    relabelled it (its config's model_type is another family's)."""
    from ..families import FAMILIES

    if cfg.model_type in adapter.model_types:
        return adapter
    return next((a for a in FAMILIES if cfg.model_type in a.model_types and a.gguf_arch), adapter)


def write_file(path: Path, arch: str, metadata, arrays: dict[str, np.ndarray]) -> None:
    """One float32 GGUF file: `metadata(writer)` adds the key-values, then the tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    metadata(w)
    for name, a in arrays.items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except OSError as e:
        # numpy's tofile reports a short write as "N requested and M written", without an errno: on a
        # local file that is a full disk
        if e.errno is None and "written" in str(e):
            raise OSError(errno.ENOSPC, f"No space left on device (a short write to {path.name}: {e})") from None
        raise


def quantize(src: Path, dst: Path, kind: str, imatrix: dict | None = None) -> None:
    """llama.cpp's own quantizer, with an importance matrix (GGUF tensor name → E[x²]) where given."""
    from ..llama_logs import quiet

    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = TYPES[kind]
    params.nthread = 0
    if imatrix:
        from .gguf_imatrix import as_param

        arr, keep = as_param(imatrix)  # noqa: F841 - the buffers must outlive the call
        params.imatrix = arr
    with quiet():  # llama.cpp's per-tensor log lines, unless BAKE_VERBOSE=1
        code = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        if shutil.disk_usage(dst.parent).free < os.path.getsize(src):  # most likely the disk filled up
            raise OSError(errno.ENOSPC, f"No space left on device (llama.cpp's quantizer could not write {dst.name})")
        raise BakeError(f"--gguf-type {kind}: llama.cpp's quantizer failed on {src.name}")
