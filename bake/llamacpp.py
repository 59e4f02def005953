"""A GGUF run by llama.cpp (through llama-cpp-python) behind the small part of the transformers API bake
uses: `model(input_ids).logits`, `model.generate(...)` (greedy), `prefill_then_decode_logits`,
`.device`, `.config`. Token ids go in as ids (the checkpoint's tokenizer beside the GGUF encodes the
prompts), so both runtimes see the very same tokens; llama.cpp's logits come back as float32."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BakeError, first_line
from .llama_logs import quiet, silence, verbose  # noqa: F401  (re-exported)

F32 = 0  # GGML_TYPE_F32


@dataclass
class _Out:
    logits: torch.Tensor


def gguf_in(path: Path) -> Path:
    """The one model-*.gguf in a baked directory (or the file itself)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path
    found = sorted(path.glob("model-*.gguf"))
    if len(found) != 1:
        raise BakeError(f"--baked/--steered: {str(path)!r} holds {len(found)} model-*.gguf files (expected one)")
    return found[0]


def beside(gguf: Path, name: str) -> dict:
    """from_pretrained's arguments for what sits beside a GGUF: the file `name` there (a bake's checkpoint),
    else the GGUF's own metadata (`gguf_file`)."""
    return {} if (gguf.parent / name).is_file() else {"gguf_file": gguf.name}


def tokenizer_beside(gguf: Path, flag: str = "--baked/--steered"):
    """The tokenizer for a GGUF: a bake's tokenizer files beside it, else the one transformers reads from
    the GGUF itself; a BakeError naming the file when neither can be read."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), trust_remote_code=False,
                                            **beside(gguf, "tokenizer_config.json"))
    except Exception as e:  # transformers raises many kinds for missing or broken tokenizer files
        where = str(gguf.parent) if (gguf.parent / "tokenizer_config.json").is_file() else str(gguf)
        raise BakeError(f"{flag}: cannot read the tokenizer of {where!r}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_control_vector(llm, path: Path, scale: float) -> None:
    """What llama.cpp's `--control-vector-scaled path scale` does (common.cpp) to a `llama_cpp.Llama`:
    direction.N × scale at offset n_embd·(N − 1) of one buffer, applied to layers 1 … n_layer."""
    import ctypes

    import llama_cpp

    from .exporters.control_vector import read

    dirs = read(path)
    n_embd = llama_cpp.llama_model_n_embd(llm.model)
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    data = np.zeros(n_embd * max(dirs), np.float32)
    for n, v in dirs.items():
        data[n_embd * (n - 1):n_embd * n] += scale * v
    buf = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    if apply(llm.ctx, buf, data.size, n_embd, 1, n_layer) != 0:
        raise BakeError(f"llama.cpp refused the control vector {path.name}")


class LlamaCppLM:
    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None,
                 lora: str | Path | None = None, lora_scale: float = 1.0,
                 control_vector: str | Path | None = None, control_scale: float = 1.0):
        """`lora`: a llama.cpp LoRA GGUF applied at `lora_scale`; `control_vector`: a control-vector GGUF at
        `control_scale` (bake's exports: the runtime's scale is the steering strength)."""
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise BakeError("a GGUF runs in llama.cpp: pip install llama-cpp-python") from e
        from transformers import AutoConfig

        from .models.loading import check_gguf_header

        self.file = gguf_in(Path(path))
        check_gguf_header(self.file, "--baked/--steered")
        for extra in (lora, control_vector):
            if extra:
                check_gguf_header(Path(extra), "--baked/--steered")
        try:
            self.config = AutoConfig.from_pretrained(str(self.file.parent), trust_remote_code=False,
                                                     **beside(self.file, "config.json"))
        except Exception as e:  # transformers raises many kinds for a bad file
            raise BakeError(f"--baked/--steered: cannot read the config of {str(self.file)!r}: {first_line(e)}") from None
        # the KV cache in float32 (llama.cpp's default is float16, an error of its own on top of the weights')
        silence()
        try:
            with quiet():
                self.llm = Llama(model_path=str(self.file), n_ctx=n_ctx, logits_all=True, verbose=verbose(), seed=0,
                                 n_threads=threads, n_batch=n_ctx, type_k=F32, type_v=F32,
                                 lora_path=str(lora) if lora else None, lora_scale=lora_scale)
        except (ValueError, RuntimeError) as e:  # llama-cpp-python: "Failed to load model from file: ..."
            what = f"{self.file.name}" + (f" with the LoRA {Path(lora).name}" if lora else "")
            raise BakeError(f"--baked/--steered: llama.cpp cannot load {what}: {first_line(e)}") from None
        self.control_vector = Path(control_vector) if control_vector else None
        if control_vector:
            apply_control_vector(self.llm, Path(control_vector), control_scale)
        self.device = torch.device("cpu")
        self.dtype = np.float32
        self.runtime = "llama.cpp"

    def eval(self):
        return self

    def logits_of(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence, from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def __call__(self, input_ids=None, attention_mask=None, **_) -> _Out:
        """Logits [batch, seq, vocab]; each row runs alone on its unmasked tokens (left or right padding),
        and padded positions get zeros (nothing reads them)."""
        rows = []
        for i, seq in enumerate(input_ids.tolist()):
            mask = [1] * len(seq) if attention_mask is None else attention_mask[i].tolist()
            at = [j for j, m in enumerate(mask) if m]
            lg = self.logits_of([seq[j] for j in at])
            row = np.zeros((len(seq), lg.shape[1]), np.float32)
            row[at] = lg
            rows.append(row)
        return _Out(torch.from_numpy(np.stack(rows)))

    def prefill_then_decode_logits(self, seq: torch.Tensor, n_prompt: int) -> torch.Tensor:
        """Logits over `seq` (1-D): the prompt in one batch, then one token per eval, as generation runs."""
        self.llm.reset()
        ids = seq.tolist()
        self.llm.eval(ids[:n_prompt])
        for t in ids[n_prompt:]:
            self.llm.eval([t])
        return torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float64))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None, pad_token_id: int | None = None,
                 **_) -> torch.Tensor:
        """Left-padded batch in, prompt + new tokens out, row by row in llama.cpp (left padding dropped
        there), each step chosen by transformers' logits processors and torch's sampler
        (`bake.sampling`); a row that ends with EOS is padded, as `generate` does."""
        from .sampling import eos_ids, next_tokens, processors

        eos = eos_ids(self.config)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        procs = processors(input_ids.shape[1], eos, do_sample, min_new_tokens, temperature, top_p, top_k,
                           repetition_penalty)
        outs = []
        for i, seq in enumerate(input_ids.tolist()):
            keep = seq if attention_mask is None else [t for t, m in zip(seq, attention_mask[i].tolist()) if m]
            self.llm.reset()
            self.llm.eval(keep)
            row = torch.tensor([seq])
            for _ in range(max_new_tokens):
                last = torch.from_numpy(np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32))[None]
                tok = int(next_tokens(procs, row, last, do_sample)[0])
                row = torch.cat([row, torch.tensor([[tok]])], 1)
                if tok in eos:
                    break
                self.llm.eval([tok])
            outs.append(row[0].tolist())
        width = max(map(len, outs))
        return torch.tensor([o + [pad] * (width - len(o)) for o in outs])
