"""llama.cpp's own HF → GGUF converter, used as a library: a baked checkpoint is a stock checkpoint, so
the converter writes it exactly as it writes the original (tensor names and layouts per architecture,
Gemma's 1 + w norms, rotary permutations, the tokenizer, merges and chat template).

The converter is `convert_hf_to_gguf.py`'s `conversion` package and llama.cpp's vendored `gguf-py`,
from the llama-cpp-python source distribution that `install.sh` builds the runtime from (one llama.cpp
commit for both): `install.sh` unpacks them into `<sys.prefix>/share/bake/llama.cpp` (or
`$BAKE_LLAMA_CPP`) and installs that `gguf-py` in place of PyPI's `gguf` (same version number, newer
code, which the converter needs). The calls are convert_hf_to_gguf.py's own: `ModelBase.load_hparams`,
`get_model_class(get_model_architecture(...))`, `model.write()`; tensors are read lazily (memory-mapped
safetensors, one tensor at a time).

What llama.cpp runs differently from transformers is refused here, before any work, rather than
verified to fail: Gemma-3 with `query_pre_attn_scalar` ≠ `head_dim` (llama.cpp scales attention by
1/√head_dim) and Qwen3-MoE with `norm_topk_prob` false (llama.cpp always renormalises the top-k)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import BakeError

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist the runtime and the converter come from (install.sh)
DIRECT = ("f32", "f16", "bf16", "q8_0")  # types the converter writes itself; others: f32, then the quantizer


def home() -> Path:
    """Where install.sh unpacked the converter."""
    env = os.environ.get("BAKE_LLAMA_CPP")
    return Path(env) if env else Path(sys.prefix) / "share" / "bake" / "llama.cpp"


def _modules(flag: str):
    """(conversion, gguf): the converter's package and llama.cpp's gguf-py, or a BakeError saying how to
    install them."""
    root = home()
    if not (root / "conversion" / "__init__.py").is_file():
        raise BakeError(f"{flag}: llama.cpp's converter is not installed in {root} (./install.sh unpacks it from "
                        f"the llama-cpp-python=={LLAMA_CPP_PYTHON} source distribution; or set BAKE_LLAMA_CPP to a "
                        f"llama.cpp checkout)")
    import gguf

    if not hasattr(gguf, "LazyChunkedTensor"):
        raise BakeError(f"{flag}: the installed gguf package is PyPI's, older than the converter's: pip install "
                        f"--force-reinstall --no-deps {root / 'gguf-py'}")
    if str(root) not in sys.path:
        sys.path.append(str(root))
    os.environ.setdefault("NO_LOCAL_GGUF", "1")  # the installed gguf-py is the vendored one
    import conversion

    return conversion, gguf


def model_class(ckpt: Path, flag: str = "--format gguf", hp: dict | None = None):
    """(converter class, hparams) for the checkpoint in `ckpt` (or for the config `hp`, a baked model's); a
    BakeError naming the architecture where the converter does not know it, or where llama.cpp would
    compute another model."""
    conversion, _ = _modules(flag)
    hp = dict(hp) if hp is not None else conversion.ModelBase.load_hparams(Path(ckpt), False)
    if "n_positions" in hp:  # transformers 5's GPT2Config no longer writes n_ctx, which the converter reads
        hp.setdefault("n_ctx", hp["n_positions"])
    arch = (hp.get("architectures") or [hp.get("model_type", "?")])[0]
    try:
        cls = conversion.get_model_class(conversion.get_model_architecture(hp, conversion.ModelType.TEXT))
    except (NotImplementedError, ValueError, KeyError):
        raise BakeError(f"{flag}: llama.cpp's converter does not know the architecture {arch!r}") from None
    _check_same_math(hp, arch, flag)
    return cls, hp


def arch_name(cls) -> str:
    """llama.cpp's name of the architecture a converter class writes (`qwen3`, `gemma3`, ...)."""
    _, gguf = _modules("--format gguf")
    return gguf.MODEL_ARCH_NAMES[cls.model_arch]


def _check_same_math(hp: dict, arch: str, flag: str) -> None:
    """Configurations llama.cpp's graph computes differently from transformers'."""
    text = {**hp, **(hp.get("text_config") or {})}
    if hp.get("model_type", "").startswith("gemma3") and "query_pre_attn_scalar" in text:
        if text["query_pre_attn_scalar"] != text.get("head_dim"):
            raise BakeError(f"{flag}: {arch} with query_pre_attn_scalar {text['query_pre_attn_scalar']} ≠ head_dim "
                            f"{text.get('head_dim')}: llama.cpp scales attention by 1/√head_dim (another model)")
    if text.get("norm_topk_prob") is False and "moe" in hp.get("model_type", ""):
        raise BakeError(f"{flag}: {arch} with norm_topk_prob false: llama.cpp always renormalises the top-k "
                        f"expert weights (another model)")


def check(model_dir: Path, flag: str = "--format gguf", vocab_from: Path | None = None) -> None:
    """Before any work: the converter knows the architecture, llama.cpp computes the same model, and the
    converter can write the tokenizer (its own `set_vocab`, run here on the source: a BPE tokenizer's
    pre-tokenizer must be one it recognises by the hash of its output, or llama.cpp would split text
    another way; Phi-3 and Gemma-2 need the SentencePiece `tokenizer.model`). `vocab_from`: the source
    GGUF whose tokenizer metadata is carried over instead (nothing to check)."""
    import tempfile

    from ..errors import first_line
    from ..llama_logs import quiet

    cls, hp = model_class(model_dir, flag)
    _, gguf = _modules(flag)
    if vocab_from is not None:
        return
    with tempfile.TemporaryDirectory(prefix="bake-vocab-") as tmp, torch.inference_mode(), quiet():
        m = cls(Path(model_dir), gguf.LlamaFileType.ALL_F32, Path(tmp) / "vocab.gguf", hparams=hp, eager=False,
                model_name="bake-check")
        try:
            m.set_vocab()
        except NotImplementedError:
            raise BakeError(f"{flag}: llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (it "
                            f"knows them by a hash of their output): llama.cpp would split text differently") from None
        except (ValueError, OSError, KeyError, TypeError, AssertionError) as e:
            raise BakeError(f"{flag}: llama.cpp's converter cannot write this model's tokenizer: {first_line(e)}"
                            ) from None


def _loads(path: Path) -> bool:
    """llama.cpp's loader takes the GGUF `path` (read with no_alloc: the header and tensor table only)."""
    import llama_cpp

    from ..llama_logs import quiet

    params = llama_cpp.llama_model_default_params()
    params.no_alloc, params.load_mode = True, 0  # no tensor data, no mmap (mmap with no_alloc aborts)
    with quiet():
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if model:
        llama_cpp.llama_model_free(model)
    return bool(model)


def _header_only(ckpt: Path, out: Path, hp: dict, extra: dict[str, tuple[int, ...]],
                 vocab_from: Path | None = None) -> Path:
    """The GGUF the converter would write from the checkpoint's tensors plus zero tensors `extra` (name →
    shape), under the config `hp`, with no tensor data (the file is sparse, of the full size): what
    llama.cpp's loader checks, in a second."""
    from ..llama_logs import quiet

    cls, hp = model_class(ckpt, hp=hp)
    _, gguf = _modules("--format gguf")
    with torch.inference_mode(), quiet():
        m = cls(Path(ckpt), gguf.LlamaFileType.ALL_F32, Path(out), hparams=hp, eager=False, model_name="bake-probe")
        m.get_vocab_base_pre = lambda tokenizer: "gpt-2"  # the vocabulary is not what is probed
        if vocab_from is not None:
            m.set_vocab = lambda: _carry_vocab(Path(vocab_from), m.gguf_writer)
        m.model_tensors.update({k: (lambda s=s: torch.zeros(s)) for k, s in extra.items()})
        m.prepare_tensors()
        m.prepare_metadata(vocab_only=False)
        w = m.gguf_writer
        w.write_header_to_file(path=Path(out))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        w.write_padding(f, f.tell())
        f.truncate(f.tell() + sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment)
                                  for ti in w.tensors[0].values()))
        f.close()
    return Path(out)


def refused(ckpt: Path, hp: dict, added: dict[str, tuple[int, ...]], flag: str = "--format gguf",
            vocab_from: Path | None = None) -> list[str]:
    """The tensors of `added` (name → shape: the biases the folds add to the checkpoint in `ckpt`, whose
    baked config is `hp`) that llama.cpp's loader for the architecture has no slot for. Asked of llama.cpp
    itself, before any work: a header-only GGUF of the checkpoint with the biases added is loaded; where
    it is refused, each kind of bias (o_proj, down_proj, ...) is probed alone. llama.cpp refuses a tensor
    its architecture has no slot for ("wrong number of tensors"); which biases it takes is its loader's,
    not a list here. A BakeError when the model itself, unsteered, is refused."""
    import tempfile

    arch = arch_name(model_class(ckpt, flag, hp)[0])
    with tempfile.TemporaryDirectory(prefix="bake-probe-") as tmp:
        def loads(extra: dict, tag: str) -> bool:
            return _loads(_header_only(ckpt, Path(tmp) / f"{tag}.gguf", hp, extra, vocab_from))

        if not added or loads(added, "all"):
            return []
        if not loads({}, "base"):
            raise BakeError(f"{flag}: llama.cpp's {arch} loader refuses this model as its converter writes it, "
                            f"before any steering (BAKE_VERBOSE=1 shows its log)")
        kinds = sorted({n.split(".")[-2] for n in added})  # o_proj, down_proj, ...
        bad = [n for k in kinds if not loads({n: s for n, s in added.items() if n.split(".")[-2] == k}, k)
               for n in sorted(added) if n.split(".")[-2] == k]
    return bad or sorted(added)


def convert(ckpt: Path, out: Path, kind: str, pre: str | None = None, flag: str = "--format gguf",
            drop=(), vocab: Path | None = None, vocab_from: Path | None = None) -> Path:
    """Write the checkpoint in `ckpt` as the GGUF `out` at `kind` (one of DIRECT), without the tensors named
    in `drop`, the tokenizer read from `vocab` (the source directory: the files `check` tried; transformers
    may save a baked copy under another class name). `pre`: the tokenizer's pre-tokenizer name where the
    converter cannot recognise it (a GGUF source's `tokenizer.ggml.pre`). `vocab_from`: a source GGUF whose
    `tokenizer.*` metadata is written instead of the converter's vocabulary (byte for byte: the model
    tokenizes as the source did)."""
    from ..errors import first_line

    from ..llama_logs import quiet

    cls, hp = model_class(ckpt, flag)
    _, gguf = _modules(flag)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    with torch.inference_mode(), quiet():
        model = cls(Path(ckpt), ftype, Path(out), hparams=hp, eager=False, model_name="bake-steered")
        if pre:
            model.get_vocab_base_pre = lambda tokenizer: pre
        for name in drop:
            model.model_tensors.pop(name, None)
        if vocab is not None:
            model.dir_model = Path(vocab)  # tensors are indexed already; set_vocab reads the tokenizer here
        if vocab_from is not None:
            model.set_vocab = lambda: _carry_vocab(Path(vocab_from), model.gguf_writer)
        try:
            model.write()
        except (NotImplementedError, ValueError, KeyError, FileNotFoundError) as e:  # e.g. an unknown pre-tokenizer
            raise BakeError(f"{flag}: llama.cpp's converter: {first_line(e)}") from None
    return Path(out)


def _carry_vocab(src: Path, writer) -> None:
    """Every `tokenizer.*` key-value of the GGUF `src`, into the converter's writer."""
    import gguf

    for key, field in gguf.GGUFReader(str(src)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def convert_lora(lora_dir: Path, base: Path, out: Path, flag: str = "--format lora") -> Path:
    """llama.cpp's own `convert_lora_to_gguf.py` (its LoRA converter has no library entry point: it runs
    as a process) on the PEFT adapter in `lora_dir`, for the base model directory `base`: the tensor names
    and layouts (rotary permutations, fused projections) of the base's converter class, f32."""
    import subprocess

    from ..errors import first_line

    script = home() / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise BakeError(f"{flag}: llama.cpp's LoRA converter is not installed in {home()} (./install.sh unpacks it)")
    _modules(flag)
    env = {**os.environ, "NO_LOCAL_GGUF": "1", "PYTHONPATH": os.pathsep.join(
        [str(home()), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, str(script), str(lora_dir), "--base", str(base), "--outtype", "f32",
                        "--outfile", str(out)], capture_output=True, text=True, env=env)
    if r.returncode != 0 or not Path(out).is_file():
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise BakeError(f"{flag}: llama.cpp's LoRA converter failed: {first_line(last[0])}")
    return Path(out)
