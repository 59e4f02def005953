"""BakeOptions: everything `bake apply` can be asked, as one frozen, typed, serialisable object.

`to_dict` / `from_dict` round-trip through JSON (the version says which fields a dict may hold);
`check` validates every field before any file is read, naming the CLI flag in its error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import BakeError
from .spec import check_strength
from .typed import build, check_fields, encode

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("safetensors", "onnx", "gguf", "lora", "control-vector")
ONNX_LAYOUTS = ("root", "onnx")


@dataclass(frozen=True)
class BakeOptions:
    LABEL = "bake options"
    version: int = 1
    dtype: str | None = None  # None: float32 in memory, each tensor's stored dtype when streamed
    formats: tuple[str, ...] = ("safetensors",)
    onnx_layout: str = "root"  # root: model.onnx beside config.json | onnx: onnx/model.onnx
    gguf_type: str | None = None  # --format gguf: f32, f16, q8_0, q4_k_m, ... (None: the source GGUF's type)
    imatrix: str | None = None  # --format gguf: calibration texts (bake measures) or llama-imatrix's .gguf
    strength: float | None = None  # overrides every map's strength
    force: bool = False  # replace a non-empty --out
    run_verify: bool = True
    prompts: tuple[str, ...] | None = None  # extra probe prompts for verify
    max_new_tokens: int = 32
    check_model: bool = True  # the spec's model fingerprint must match
    insert_modules: bool = False  # keep what does not fold as generated modules
    approximate: bool = False  # fold support-masked affine maps as if unbounded
    stream: bool | None = None  # None: stream a sharded checkpoint when nothing asks for a loaded model
    link: bool = False  # streaming: hard-link untouched shards
    inputs: tuple[str, ...] = field(default=())  # more files the run reads, which --out must not touch
    device: str = "cpu"  # where verify runs the reference and the baked model (folding is on the CPU)
    device_map: str | None = None  # or verify spreads them by accelerate (auto)

    def __post_init__(self) -> None:
        for k in ("formats", "prompts", "inputs"):  # lists (from callers, from JSON) are stored as tuples
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, tuple(str(x) for x in getattr(self, k)))
        if self.strength is not None:  # finite, not a bool, not an int too large for a float
            object.__setattr__(self, "strength", check_strength(self.strength, "--strength"))
        check_fields(self)  # a wrong type is a BakeError naming the field
        if self.version != 1:
            raise BakeError(f"bake options: version: {self.version!r} is not a version this bake reads (1)")

    def replace(self, **changes) -> BakeOptions:
        """A copy with `changes` (an unknown field is a TypeError, as for any dataclass)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-safe: tuples as lists."""
        return encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> BakeOptions:
        """The inverse of `to_dict`; missing keys take their defaults; unknown keys or wrong types are a
        BakeError naming the field."""
        return build(cls, data)

    @property
    def simple(self) -> bool:
        """Nothing asks for a loaded model: safetensors in the stored dtypes, nothing inserted."""
        return self.dtype is None and self.formats == ("safetensors",) and not self.insert_modules

    @property
    def _streams_gguf(self) -> bool:
        """safetensors and a GGUF converted from them: a streamed bake can write both."""
        return self.dtype is None and set(self.formats) == {"safetensors", "gguf"} and not self.insert_modules

    def check(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BakeError(f"--dtype: unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        bad = [f for f in self.formats if f not in FORMATS]
        if not self.formats or bad:
            raise BakeError(f"--format: unknown format {(bad or [''])[0]!r} (known: {', '.join(FORMATS)}; "
                            f"comma-separate for several)")
        if "onnx" in self.formats and self.dtype == "bfloat16":
            raise BakeError("--dtype bfloat16: not with --format onnx (ONNX Runtime's CPU kernels lack bfloat16; "
                            "use float32 or float16)")
        if self.onnx_layout not in ONNX_LAYOUTS:
            raise BakeError(f"--onnx-layout: root (model.onnx beside config.json) or onnx (onnx/model.onnx, as "
                            f"transformers.js expects), got {self.onnx_layout!r}")
        if "gguf" in self.formats and self.insert_modules:
            raise BakeError("--format gguf: not with --insert-modules (llama.cpp runs no generated code: only "
                            "folded steering reaches a GGUF)")
        if self.max_new_tokens < 1:
            raise BakeError(f"--max-new-tokens: must be at least 1, got {self.max_new_tokens}")
        if self.gguf_type is not None and "gguf" not in self.formats:
            raise BakeError("--gguf-type: only with --format gguf")
        if self.imatrix is not None and "gguf" not in self.formats:
            raise BakeError("--imatrix: only with --format gguf (an importance matrix for llama.cpp's quantizer)")
        if self.stream and not (self.simple or self._streams_gguf):
            raise BakeError("--stream: writes safetensors in the stored dtypes only, and GGUF from them (drop --dtype, "
                            "--format onnx, lora, control-vector and --insert-modules)")
        if self.stream and self.imatrix and not self.imatrix.endswith(".gguf"):
            raise BakeError("--imatrix: with --stream only llama-imatrix's .gguf (measuring one needs the model loaded)")


def parse_formats(text: str) -> tuple[str, ...]:
    """Comma-separated formats; gguf, lora and control-vector are written beside the safetensors checkpoint
    (its tokenizer; the baked model a LoRA or control vector at scale 1 equals), so they bring it along."""
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    if {"gguf", "lora", "control-vector"} & set(fmts) and "safetensors" not in fmts:
        fmts.insert(0, "safetensors")
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise BakeError(f"--format: unknown format {(bad or [text])[0]!r} (known: {', '.join(FORMATS)}; "
                        f"comma-separate for several)")
    return tuple(dict.fromkeys(fmts))
