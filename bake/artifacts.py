"""Opening a baked (or any model) directory as a runnable model, as a user would: the one opener
that verify, diff and eval share.

Formats:
- `safetensors`: config.json + *.safetensors, loaded with stock `from_pretrained`; when the directory
  carries generated code (`modeling_bake.py`, for inserted modules) only with an explicit
  `trust_code`, and `trust_remote_code=True` is passed only then.
- `onnx`: an ONNX export (`model.onnx`, `onnx_info.json`), run with ONNX Runtime (`bake/ort.py`).
- `gguf`: a `model-<TYPE>.gguf` beside the checkpoint, run with llama.cpp (`bake/llamacpp.py`).
- `lora`: the PEFT adapter in `lora/`, on the base model it names, with `PeftModel.from_pretrained`.
- `pipeline`: a diffusers pipeline directory (`model_index.json`), from safetensors only.

Below verify, diff, eval and cli: it imports only models, modules and ort.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BakeError, first_line
from .models.loading import exact_experts

CAUSAL_FORMATS = ("safetensors", "onnx", "gguf", "lora")
FORMATS = (*CAUSAL_FORMATS, "pipeline")
TO_RUN = " to run it"  # the default tail of the refusal to run generated code


@dataclass
class Artifact:
    """A runnable model opened from a directory: `tokenizer` is None for a pipeline."""

    model: object
    tokenizer: object
    format: str
    dtype: str
    path: Path

    @property
    def runtime(self) -> str:
        """Which runtime runs it: the ONNX Runtime execution provider, llama.cpp, or PyTorch."""
        return getattr(self.model, "provider", None) or getattr(self.model, "runtime", "PyTorch")


def has_checkpoint(path: str | Path) -> bool:
    """A transformers checkpoint: config.json and safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def check_dir(path: str | Path, flag: str = "--baked", marker: str = "config.json") -> None:
    """Fail before any work when `path` is not a model directory (it lacks `marker`) or a GGUF file."""
    if Path(path).suffix == ".gguf" and Path(path).is_file() and marker == "config.json":
        return
    if not (Path(path) / marker).is_file():
        raise BakeError(f"{flag}: {str(path)!r} is not a model directory (no {marker})")


def formats_in(path: str | Path, flag: str = "--baked") -> list[str]:
    """What a causal-LM bake output directory holds (safetensors weights, an ONNX graph, a GGUF, a LoRA),
    or ["gguf"] for a GGUF file."""
    from .ort import is_onnx_dir

    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return ["gguf"]
    found = [f for f, ok in (("safetensors", any(p.glob("*.safetensors"))), ("onnx", is_onnx_dir(p)),
                             ("gguf", any(p.glob("model-*.gguf"))), ("lora", _has_lora(p))) if ok]
    if not found:
        raise BakeError(f"{flag}: {str(path)!r} holds neither safetensors weights nor model.onnx")
    return found


def pipeline_formats(path: str | Path, denoiser: str) -> list[str]:
    """What a pipeline bake output holds: the steered pipeline (`safetensors`) and/or the ONNX denoiser."""
    p = Path(path)
    return [f for f, ok in (("safetensors", (p / "model_index.json").is_file()),
                            ("onnx", denoiser_graph(p, denoiser).is_file())) if ok]


def denoiser_graph(path: str | Path, denoiser: str) -> Path:
    """Where a pipeline bake writes its ONNX denoiser."""
    return Path(path) / denoiser / "model.onnx"


def _resolve_format(p: Path, name: str, fmt: str, flag: str, allowed: tuple[str, ...]) -> str:
    """`auto`: safetensors when there is a checkpoint, else ONNX; an explicit format must be allowed and there."""
    from .ort import is_onnx_dir

    if p.suffix == ".gguf" and p.is_file() and fmt in ("auto", "gguf") and "gguf" in allowed:
        return "gguf"  # a GGUF file itself (bake's, or any llama.cpp model of that architecture)
    if not p.is_dir():
        raise BakeError(f"{flag}: {name!r} is not a directory")
    has = {"safetensors": has_checkpoint(p), "onnx": is_onnx_dir(p), "pipeline": (p / "model_index.json").is_file(),
           "gguf": any(p.glob("model-*.gguf")), "lora": _has_lora(p)}
    if fmt == "auto":
        fmt = next((f for f in CAUSAL_FORMATS if has[f]), "")
        if not fmt:
            raise BakeError(f"{flag}: {name!r} is not a model directory (no safetensors weights with "
                            f"config.json, no model.onnx)")
    if fmt not in allowed:
        raise BakeError(f"--format: unknown format {fmt!r}")
    if not has[fmt]:
        what = {"safetensors": "safetensors checkpoint", "onnx": "model.onnx", "pipeline": "model_index.json",
                "gguf": "model-*.gguf", "lora": "lora/adapter_config.json"}[fmt]
        raise BakeError(f"{flag}: {name!r} holds no {what}")
    return fmt


def open_artifact(path: str | Path, fmt: str = "auto", *, provider: str = "auto", trust_code: bool = False,
                  dtype: str = "float32", flag: str = "--steered", hint: str = TO_RUN,
                  allowed: tuple[str, ...] = CAUSAL_FORMATS, device: str = "cpu",
                  device_map: str | None = None) -> Artifact:
    """Open `path` as `fmt`, one of `allowed` (`auto`: a causal-LM checkpoint, else its ONNX export).
    `dtype` for safetensors: `float32`, or `auto` for the stored dtype; `device` (cpu, cuda, auto) or an
    accelerate `device_map` (auto: across GPUs, then CPU) for safetensors and LoRA; `provider` for ONNX Runtime;
    `flag` names the option in messages; `hint` ends the refusal to run generated code without
    `trust_code`."""
    p = Path(path)
    fmt = _resolve_format(p, str(path), fmt, flag, allowed)
    if fmt == "onnx":
        return _open_onnx(p, provider)
    if fmt == "pipeline":
        return open_pipeline(p)
    if fmt == "gguf":
        return _open_gguf(p)
    from .models.loading import placement as where

    placement = where(device, device_map)
    if fmt == "lora":
        return _open_lora(p, flag, placement)
    return _open_safetensors(p, str(path), trust_code, dtype, flag, hint, placement)


def _open_onnx(p: Path, provider: str) -> Artifact:
    """An ONNX export with its tokenizer, on the ONNX Runtime provider asked for."""
    from .ort import load_onnx

    model, tok = load_onnx(p, provider)
    return Artifact(model, tok, "onnx", model.dtype.__name__, p)


def _open_gguf(p: Path) -> Artifact:
    """A GGUF run in llama.cpp: a baked directory's model-<TYPE>.gguf or a .gguf file, with the tokenizer
    beside it (a bake's checkpoint), else the one transformers reads from the GGUF itself; with the
    control-vector sidecar bake wrote for it, at scale 1, where there is one."""
    from .exporters.control_vector import sidecar
    from .llamacpp import LlamaCppLM, gguf_in, tokenizer_beside

    with_vector = sidecar(gguf_in(p))  # `--format gguf,control-vector`: the GGUF runs with its sidecar
    model = LlamaCppLM(p, control_vector=with_vector)
    tok = tokenizer_beside(model.file)
    return Artifact(model, tok, "gguf", model.file.stem, p)


def _has_lora(p: Path) -> bool:
    return (p / "lora" / "adapter_config.json").is_file()


def _open_lora(p: Path, flag: str, placement: dict) -> Artifact:
    """The PEFT adapter in `p/lora` on its base model (float32, stock from_pretrained), at scale 1. The
    weights are read from adapter_model.safetensors only, by bake: PEFT's own loader falls back to
    torch.load (a pickle) for adapter_model.bin."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise BakeError(f"{flag}: running the LoRA adapter needs peft (pip install peft)") from e
    d = p / "lora"
    doc = _lora_config(d / "adapter_config.json", flag)
    weights = _lora_weights(d, flag)
    base = doc["base_model_name_or_path"]
    if not Path(base).is_dir():
        raise BakeError(f"{flag}: the LoRA adapter's base model {base!r} is not a local directory")
    conf = _peft_config(d / "adapter_config.json", doc, flag)
    art = _open_safetensors(Path(base), base, False, "float32", flag, TO_RUN, placement)
    try:
        model = PeftModel(art.model, conf)
        _load_lora(model, weights, d / "adapter_model.safetensors", flag)
    except BakeError:
        raise
    except Exception as e:  # target modules the base lacks, shapes that differ
        raise BakeError(f"{flag}: cannot apply {str(d)!r} to {base!r}: {first_line(e)}") from None
    return Artifact(model.eval(), art.tokenizer, "lora", "float32", p)


def check_lora(p: Path, flag: str = "--baked") -> None:
    """The LoRA in `p/lora` is one bake can run (a readable config naming its base model, safetensors
    weights): refused before any work, where a verify would otherwise first run the other formats."""
    _lora_config(Path(p) / "lora" / "adapter_config.json", flag)
    _lora_file(Path(p) / "lora", flag)


def _lora_file(d: Path, flag: str) -> Path:
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        pickle = " (adapter_model.bin is a pickle: bake never loads one)" if (d / "adapter_model.bin").exists() else ""
        raise BakeError(f"{flag}: {str(f)!r} is missing{pickle}; bake reads LoRA weights from safetensors only")
    return f


def _lora_config(f: Path, flag: str) -> dict:
    """adapter_config.json as a dict with a base model path, or one line naming the file and field."""
    import json

    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BakeError(f"{flag}: {str(f)!r} is not readable JSON ({first_line(e)})") from None
    if not isinstance(doc, dict):
        raise BakeError(f"{flag}: {str(f)!r} is not a JSON object")
    base = doc.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise BakeError(f"{flag}: {str(f)!r}: base_model_name_or_path is missing or not a path (the base model "
                        f"the adapter applies to)")
    return doc


def _lora_weights(d: Path, flag: str) -> dict:
    """adapter_model.safetensors' tensors (never adapter_model.bin: a pickle)."""
    from safetensors.torch import load_file

    f = _lora_file(d, flag)
    try:
        return load_file(str(f))
    except Exception as e:  # a truncated or foreign file
        raise BakeError(f"{flag}: {str(f)!r} is not a readable safetensors file: {first_line(e)}") from None


def _peft_config(f: Path, doc: dict, flag: str):
    """The PEFT config of the adapter, for inference; one line naming the file where PEFT refuses it."""
    from peft import PeftConfig

    try:
        conf = PeftConfig.from_pretrained(str(f.parent))
    except Exception as e:  # an unknown peft_type, a field of the wrong type
        raise BakeError(f"{flag}: {str(f)!r} is not a PEFT adapter config: {first_line(e)}") from None
    if str(getattr(conf, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise BakeError(f"{flag}: {str(f)!r}: peft_type {doc.get('peft_type')!r} (bake writes and runs LORA)")
    conf.inference_mode = True
    return conf


def _load_lora(model, weights: dict, f: Path, flag: str) -> None:
    """The adapter's tensors into the PEFT model; every LoRA weight must be in the file and every tensor
    in the file must be one."""
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model, weights)
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing or res.unexpected_keys:
        what = (f"lacks {missing[0]!r} ({len(missing)} missing)" if missing
                else f"holds {res.unexpected_keys[0]!r}, which the adapter config does not target")
        raise BakeError(f"{flag}: {str(f)!r} {what}")


def open_pipeline(p: Path) -> Artifact:
    """A diffusers pipeline directory, float32, as one `PipelineModel` (no tokenizer of its own)."""
    from .models.diffusion import load_pipeline

    return Artifact(load_pipeline(p), None, "pipeline", "float32", p)


def _open_safetensors(p: Path, name: str, trust_code: bool, dtype: str, flag: str, hint: str,
                      placement: dict | None = None) -> Artifact:
    """A checkpoint with `from_pretrained`: stock, or its generated code when it has some and `trust_code`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modules import CODE, needs_code, stock_config

    code = needs_code(p)
    if code and not trust_code:  # a stock loader would silently drop the inserted modules: refuse instead
        raise BakeError(f"{flag}: {name!r} carries generated code ({CODE}, for inserted modules); read it, "
                        f"then pass --trust-remote-code{hint}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                     trust_remote_code=code, use_safetensors=True, **(placement or {}))
        # the stock config (bake_<type>: its stock type's): the tokenizer never runs the checkpoint's code
        tok = AutoTokenizer.from_pretrained(str(p), config=stock_config(p), trust_remote_code=False)
    except Exception as e:
        how = "from_pretrained(trust_remote_code=True)" if code else "stock from_pretrained"
        raise BakeError(f"{flag}: cannot load {name!r} with {how}: {first_line(e)}") from None
    exact_experts(model.eval())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Artifact(model, tok, "safetensors", str(model.dtype).replace("torch.", ""), p)
