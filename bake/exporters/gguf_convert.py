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


def model_class(ckpt: Path, flag: str = "--format gguf"):
    """(converter class, hparams) for the checkpoint in `ckpt`; a BakeError naming the architecture where
    the converter does not know it, or where llama.cpp would compute another model."""
    conversion, _ = _modules(flag)
    hp = conversion.ModelBase.load_hparams(Path(ckpt), False)
    if "n_positions" in hp:  # transformers 5's GPT2Config no longer writes n_ctx, which the converter reads
        hp.setdefault("n_ctx", hp["n_positions"])
    arch = (hp.get("architectures") or [hp.get("model_type", "?")])[0]
    try:
        cls = conversion.get_model_class(conversion.get_model_architecture(hp, conversion.ModelType.TEXT))
    except (NotImplementedError, ValueError, KeyError):
        raise BakeError(f"{flag}: llama.cpp's converter does not know the architecture {arch!r}") from None
    _check_same_math(hp, arch, flag)
    return cls, hp


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


def check(model_dir: Path, flag: str = "--format gguf") -> None:
    """Before any work: the converter knows the architecture, llama.cpp computes the same model, and a BPE
    tokenizer's pre-tokenizer is one the converter recognises (it names it by a hash of its output; an
    unknown one would be written as the wrong pre-tokenizer or refused after the bake)."""
    from ..llama_logs import quiet

    cls, _ = model_class(model_dir, flag)
    if (Path(model_dir) / "tokenizer.model").is_file() or not (Path(model_dir) / "tokenizer.json").is_file():
        return  # SentencePiece (or no tokenizer file the BPE check reads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    try:
        with quiet():
            cls.get_vocab_base_pre(None, tok)  # only its logger reads `self`
    except NotImplementedError:
        raise BakeError(f"{flag}: llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (it "
                        f"knows them by a hash of their output): llama.cpp would split text differently") from None


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


def _header_only(ckpt: Path, out: Path, keep) -> Path:
    """The GGUF the converter would write from the checkpoint's tensors that `keep(name)` accepts, with no
    tensor data (the file is sparse, of the full size): what llama.cpp's loader checks, in a second."""
    from ..llama_logs import quiet

    cls, hp = model_class(ckpt)
    _, gguf = _modules("--format gguf")
    with torch.inference_mode(), quiet():
        m = cls(Path(ckpt), gguf.LlamaFileType.ALL_F32, Path(out), hparams=hp, eager=False, model_name="bake-probe")
        m.get_vocab_base_pre = lambda tokenizer: "gpt-2"  # the vocabulary is not what is probed
        m.model_tensors = {k: v for k, v in m.model_tensors.items() if keep(k)}
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


def refused_tensors(path: Path, ckpt: Path, source: Path) -> list[str]:
    """[] when llama.cpp's loader takes the converted GGUF `path`; else the bias tensors a fold added (the
    checkpoint's, not the source's) that it refuses: each kind of added bias (o_proj, down_proj, ...) is
    probed alone on a header-only file. ["?"] when the file is refused for another reason. llama.cpp
    refuses a tensor its architecture has no slot for ("wrong number of tensors"); which biases each
    architecture takes is its loader's, not a list here."""
    import tempfile

    from safetensors import safe_open

    if _loads(path):
        return []

    def biases(folder: Path) -> set[str]:
        names = set()
        for f in Path(folder).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                names |= {k for k in h.keys() if k.endswith(".bias")}
        return names

    added = biases(ckpt) - biases(source)
    kinds = sorted({n.split(".")[-2] for n in added})  # o_proj, down_proj, ...
    bad = []
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        for kind in kinds:
            probe = _header_only(ckpt, Path(tmp) / f"{kind}.gguf",
                                 lambda n, k=kind: n not in added or n.split(".")[-2] == k)
            if not _loads(probe):
                bad += sorted(n for n in added if n.split(".")[-2] == kind)
    return bad or ["?"]


def convert(ckpt: Path, out: Path, kind: str, pre: str | None = None, flag: str = "--format gguf") -> Path:
    """Write the checkpoint in `ckpt` as the GGUF `out` at `kind` (one of DIRECT). `pre`: the tokenizer's
    pre-tokenizer name where the converter cannot recognise it (a GGUF source's `tokenizer.ggml.pre`)."""
    from ..llama_logs import quiet

    cls, hp = model_class(ckpt, flag)
    _, gguf = _modules(flag)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    with torch.inference_mode(), quiet():
        model = cls(Path(ckpt), ftype, Path(out), hparams=hp, eager=False, model_name="bake-steered")
        if pre:
            model.get_vocab_base_pre = lambda tokenizer: pre
        try:
            model.write()
        except NotImplementedError as e:  # e.g. a BPE pre-tokenizer the converter has no hash for
            raise BakeError(f"{flag}: llama.cpp's converter: {str(e).strip().splitlines()[0]}") from None
    return Path(out)
