"""Running an exported ONNX model with ONNX Runtime: provider choice, the KV-cache step, and a
small generate loop with the same sampling rules as transformers' `generate`, so that verify, diff
and eval treat an ONNX directory like any model.

Provider: CUDAExecutionProvider when onnxruntime-gpu is installed and sees a GPU, else
CPUExecutionProvider; `provider` says which was taken.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BakeError, first_line
from .exporters.onnx_lm import GRAPH, LAYOUTS, io_names
from .ort_session import open_session

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def is_onnx_dir(path: str | Path) -> bool:
    """Does the directory hold an ONNX export (onnx_info.json or the graph, at the root or under onnx/)?"""
    p = Path(path)
    return (p / "onnx_info.json").is_file() or (p / GRAPH).is_file() or (p / "onnx" / GRAPH).is_file()


@dataclass
class _Out:
    logits: torch.Tensor


class OrtCausalLM:
    """An exported decoder graph behind the small part of the transformers API bake uses:
    `model(input_ids, attention_mask).logits`, `model.generate(...)`, `.device`, `.config`."""

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None,
                 spin: bool = True):
        from .modules import stock_config

        path = Path(path)
        try:
            info = json.loads((path / "onnx_info.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            info = None
        rel = info.get("graph", GRAPH) if isinstance(info, dict) else GRAPH
        if rel not in LAYOUTS.values():  # a name from the file: never a path out of the directory
            raise BakeError(f"{str(path)!r}: onnx_info.json names the graph {rel!r} (expected one of "
                            f"{', '.join(LAYOUTS.values())})")
        graph = path / rel
        if not graph.is_file():
            raise BakeError(f"--steered/--baked: {str(path)!r} holds no {rel}")
        if info is None:
            raise BakeError(f"{str(path)!r}: onnx_info.json is missing or unreadable (export with bake apply "
                            f"--format onnx)")
        try:
            self.config = stock_config(path)  # never prompt, never run code (bake_<type>: the stock type's class)
        except Exception as e:  # remote code asked for, or an unreadable config
            raise BakeError(f"{str(path)!r}: cannot read config.json without running its code: "
                            f"{first_line(e)}") from None
        self.session = open_session(graph, provider, threads, spin)
        self.provider = self.session.get_providers()[0]
        self.n_layers = info["num_layers"]
        self.kv = info.get("kv") or [[info["kv_heads"], info["head_dim"]] * 2] * self.n_layers  # older exports: one shape
        self.dtype = NP_DTYPES[info["dtype"]]
        ins, outs = io_names(self.n_layers)
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        self.positions = "position_ids" in got_in  # absent where the model reads none (ALiBi: BLOOM, MPT)
        unknown = [n for n in got_in if n not in ins]
        optional = () if unknown else ("position_ids",)
        missing = [n for n in ins if n not in got_in and n not in optional] + [n for n in outs if n not in got_out]
        if missing or unknown:
            what = f"lacks input/output {missing[0]!r} ({len(missing)} missing" if missing else \
                f"has input {unknown[0]!r} ({len(unknown)} unknown"
            raise BakeError(f"{str(graph)!r}: the graph {what}; expected Optimum's decoder names)")
        self.inputs, self.outputs = ins, outs
        self.device = torch.device("cpu")
        self.path = path

    # one step of the graph ------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=self.dtype) for kh, kd, vh, vd in self.kv for h, d in ((kh, kd), (vh, vd))]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """ids [b, s] after a cache of length p; mask [b, p + s] (1 = real token)."""
        p = past[0].shape[2]
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, p:].astype(np.int64)
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if self.positions:
            feed["position_ids"] = pos
        feed.update(zip(self.inputs[3:], past))
        res = self.session.run(None, feed)
        return res[0], res[1:]

    # the transformers-like surface --------------------------------------------------------------
    def eval(self):
        return self

    def __call__(self, input_ids=None, attention_mask=None, **_) -> _Out:
        ids = input_ids.cpu().numpy()
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).cpu().numpy()
        logits, _ = self.step(ids, mask, self.empty_past(ids.shape[0]))
        return _Out(torch.from_numpy(logits.astype(np.float32)))

    def prefill_then_decode_logits(self, seq: torch.Tensor, n_prompt: int) -> torch.Tensor:
        """Logits over `seq` (1-D): the first n_prompt tokens in one call, then one token per call
        with the KV cache, as generation runs."""
        ids = seq.cpu().numpy()[None]
        past = self.empty_past(1)
        logits, past = self.step(ids[:, :n_prompt], np.ones((1, n_prompt), np.int64), past)
        rows = [logits[0]]
        for t in range(n_prompt, ids.shape[1]):
            logits, past = self.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), past)
            rows.append(logits[0])
        return torch.from_numpy(np.concatenate(rows).astype(np.float64))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None, pad_token_id: int | None = None,
                 **_) -> torch.Tensor:
        """Left-padded batch in, prompt + new tokens out, with transformers' own logits processors
        (repetition penalty, min length, temperature, top-p, top-k) and torch's sampler."""
        from .sampling import eos_ids, next_tokens, processors

        eos = eos_ids(self.config)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        procs = processors(input_ids.shape[1], eos, do_sample, min_new_tokens, temperature, top_p, top_k,
                           repetition_penalty)
        seq = input_ids.cpu()
        mask = (attention_mask if attention_mask is not None else torch.ones_like(seq)).cpu()
        done = torch.zeros(seq.shape[0], dtype=torch.bool)
        logits, past = self.step(seq.numpy(), mask.numpy(), self.empty_past(seq.shape[0]))
        for _ in range(max_new_tokens):
            nxt = next_tokens(procs, seq, torch.from_numpy(logits[:, -1].astype(np.float32)), do_sample)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            done |= torch.isin(nxt, torch.tensor(eos)) if eos else done
            if bool(done.all()):
                break
            logits, past = self.step(nxt[:, None].numpy(), mask.numpy(), past)
        return seq


def load_onnx(path: str | Path, provider: str = "auto"):
    """(model, tokenizer) for an ONNX directory written by bake."""
    from transformers import AutoTokenizer

    model = OrtCausalLM(path, provider, threads=int(os.environ.get("BAKE_ORT_THREADS", "0")) or None)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), config=model.config, trust_remote_code=False)
    except Exception as e:
        raise BakeError(f"{str(path)!r}: cannot load its tokenizer without running its code: "
                        f"{first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
