"""ONNX exporter: the baked model as one decoder graph with a KV cache, in the input/output names
Hugging Face Optimum uses for decoder models, so that existing ONNX tooling (Optimum's
ORTModelForCausalLM, onnxruntime-genai-style loops) can drive it:

    inputs : input_ids [batch, sequence], attention_mask [batch, past + sequence],
             position_ids [batch, sequence], past_key_values.N.key / .value [batch, kv_heads, past, head_dim]
    outputs: logits [batch, sequence, vocab], present.N.key / .value [batch, kv_heads, past + sequence, head_dim]

The same graph serves the prompt (past of length 0) and every decode step. It is traced with
torch.onnx's TorchScript exporter (opset 17): on this model family it exports in seconds, where the
dynamo exporter takes minutes (see MEASURED.md). Whatever the passes folded is in the weights;
nothing else is in the graph. Weights go to external data (`model.onnx.data`) when the model is
larger than protobuf's 2 GB limit.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from ..errors import BakeError

OPSET = 17
GRAPH = "model.onnx"
LAYOUTS = {"root": GRAPH, "onnx": f"onnx/{GRAPH}"}  # onnx/: the layout transformers.js expects
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave room for the graph itself


class WithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, k0, v0, k1, v1, …) → (logits, k0', v0', …)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def sliding(config) -> bool:
    """Mistral / Qwen2 with an active sliding window (a window shorter than the context)."""
    w = getattr(config, "sliding_window", None)
    if w is None or not getattr(config, "use_sliding_window", True):
        return False
    return w < getattr(config, "max_position_embeddings", w + 1)


def supported_types() -> list[str]:
    from ..families import FAMILIES

    return [t for a in FAMILIES if a.modality == "causal-lm" and a.onnx is None for t in a.model_types]


def check_supported(model: torch.nn.Module) -> None:
    """The family table says whether it exports (`Adapter.onnx`: None, or why not)."""
    from ..families import adapter_for

    mt = getattr(model.config, "model_type", None)
    try:
        why = adapter_for(model).onnx
    except BakeError:
        why = ""
    if why is None and sliding(model.config):
        raise BakeError(f"--format onnx: not supported for {mt} with a sliding window "
                        f"({model.config.sliding_window} tokens) yet: its KV cache does not trace to a shape-generic "
                        f"graph with this exporter (safetensors works)")
    if why is not None:
        raise BakeError(f"--format onnx: not supported for model type {mt!r} yet{': ' + why if why else ''} "
                        f"(supported: {', '.join(supported_types())}; safetensors works)")


def export(model: torch.nn.Module, tokenizer, out: Path, dtype: str = "float32", log=print,
           layout: str = "root") -> dict:
    """Write out/model.onnx (or out/onnx/model.onnx for `layout` "onnx"; + model.onnx.data when
    large), the tokenizer, config.json, onnx_info.json (names, dtype, opset, sizes) and
    genai_config.json for onnxruntime-genai. Returns onnx_info."""
    import onnx

    check_supported(model)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if dtype == "bfloat16":
        raise BakeError("--dtype bfloat16: ONNX Runtime's CPU kernels lack bfloat16; export float32 or float16")
    model = model.to(torch_dtype).eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    heads, head_dim = kv_shape(cfg)
    ins, outs = io_names(n_layers)
    # sample: batch 2, 3 new tokens after 4 cached ones, one left-padded row (so the traced graph
    # keeps the padding mask path)
    b, s, p = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = [torch.zeros(b, heads, p, head_dim, dtype=torch_dtype) for _ in range(2 * n_layers)]
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for n in ins[3:]:
        dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in outs[1:]:
        dyn[n] = {0: "batch_size", 2: "total_sequence_length"}
    wrapper = WithPast(model)
    rel = LAYOUTS[layout]
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    attn = getattr(cfg, "_attn_implementation", None)
    try:
        cfg._attn_implementation = "eager"  # plain MatMul/Softmax ops: runs on every ORT provider
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (ids, mask, pos, *past), str(path), input_names=ins, output_names=outs,
                              dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    finally:
        cfg._attn_implementation = attn
    proto = onnx.load(str(path), load_external_data=True)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = size > PROTOBUF_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data" if external else None)
    tokenizer.save_pretrained(str(out))
    cfg.save_pretrained(str(out))
    info = {"format": "onnx", "graph": rel, "external_data": external, "opset": OPSET, "dtype": dtype,
            "num_layers": n_layers, "kv_heads": heads, "head_dim": head_dim, "inputs": ins, "outputs": outs,
            "export_seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(GRAPH))}
    (out / "onnx_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    genai = genai_config(cfg, info)
    if genai:
        (out / "genai_config.json").write_text(json.dumps(genai, indent=1) + "\n", encoding="utf-8")
    log(f"  onnx: {GRAPH} ({info['bytes'] / 1e6:.0f} MB, opset {OPSET}) in {info['export_seconds']} s")
    return info


def genai_config(cfg, info: dict) -> dict | None:
    """onnxruntime-genai's genai_config.json for this graph (None for a model type it does not run).
    The graph concatenates past and new keys (present = past + new), so the KV buffers cannot be
    shared: `past_present_share_buffer` is false (with true, genai's output diverges)."""
    from ..families import FAMILIES

    if not any(cfg.model_type in a.model_types and a.onnx_genai for a in FAMILIES):
        return None
    ids = {k: getattr(cfg, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    eos = ids["eos"] if ids["eos"] is not None else 0
    heads = cfg.num_attention_heads
    return {
        "model": {
            "bos_token_id": ids["bos"] if ids["bos"] is not None else eos, "eos_token_id": eos,
            "pad_token_id": ids["pad"] if ids["pad"] is not None else eos,
            "context_length": int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": info["graph"], "head_size": info["head_dim"],
                "hidden_size": cfg.hidden_size, "num_attention_heads": heads,
                "num_hidden_layers": info["num_layers"], "num_key_value_heads": info["kv_heads"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
            "type": cfg.model_type, "vocab_size": cfg.vocab_size,
        },
        "search": {"do_sample": False, "max_length": int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
                   "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
