"""ONNX exporter: the baked model as one decoder graph with a KV cache, in the input/output names
Hugging Face Optimum uses for decoder models, so that existing ONNX tooling (Optimum's
ORTModelForCausalLM, onnxruntime-genai-style loops) can drive it:

    inputs : input_ids [batch, sequence], attention_mask [batch, past + sequence],
             position_ids [batch, sequence], past_key_values.N.key / .value [batch, kv_heads, past, head_dim]
    outputs: logits [batch, sequence, vocab], present.N.key / .value [batch, kv_heads, past + sequence, head_dim]

The same graph serves the prompt (past of length 0) and every decode step. It is traced with
torch.onnx's TorchScript exporter (opset 17): it exports in seconds, where the dynamo exporter takes
minutes (see MEASURED.md). Whatever the passes folded is in the weights; nothing else is in the graph.
Weights go to external data (`model.onnx.data`) when the model is larger than protobuf's 2 GB limit.

Which models export is read from the model, not from a table (`cache_layout`): one forward pass shows
each layer's cache. Every layer keeping keys and values exports, whatever the family (its key and value
widths per layer go to onnx_info.json: MLA's keys are wider than its values). A layer keeping a
state-space or linear-attention state is refused, naming the layer: the graph carries key/value caches
only. Sliding-window layers export with a full cache: the present keys keep growing, and the sliding
mask, computed from absolute positions, hides what lies outside the window, so the logits are the
model's (a cropped cache would freeze its length into the traced graph). Mixture-of-experts blocks are
traced with transformers' `batched_mm` experts (every token through its own top-k experts, gathered:
static shapes), where the per-expert loop would freeze which experts the sample hit. Verify runs the
graph in ONNX Runtime against the hooked reference either way.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import torch

from ..errors import BakeError
from ..models.compat import cache_kwargs, cache_of

OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's lowest well-supported opset
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

        cache = DynamicCache()  # plain layers: a sliding-window layer keeps its full past (the mask hides it)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **cache_kwargs(self.model, cache))
        present = []
        for layer in cache_of(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_layout(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """Per layer (key heads, key width, value heads, value width), read from one forward pass of two
    tokens; a layer whose cache holds no keys and values (a state-space or linear-attention state) is
    refused, naming it."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    mt = getattr(model.config, "model_type", None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]], device=model.device), use_cache=True)
    layers = getattr(cache_of(out), "layers", None)
    if not layers or len(layers) != model.config.num_hidden_layers:
        raise BakeError(f"--format onnx: not supported for model type {mt!r}: its cache is not one key/value "
                        f"cache per layer (safetensors works)")
    shapes = []
    for i, layer in enumerate(layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):  # subclasses add conv / SSM states
            raise BakeError(f"--format onnx: not supported for model type {mt!r}: layer {i} keeps a "
                            f"{type(layer).__name__}, not a plain key/value cache (a state-space, linear-"
                            f"attention or indexer state), and the graph carries key/value caches only "
                            f"(safetensors works)")
        shapes.append((layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[1], layer.values.shape[3]))
    return shapes


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def check_supported(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """Before any work: the cache layout, or the reason the model cannot export (see `cache_layout`)."""
    return cache_layout(model)


@contextlib.contextmanager
def traceable(model: torch.nn.Module):
    """Eager attention (plain MatMul/Softmax: runs on every ORT provider) and batched experts while
    tracing; the model's own settings after."""
    cfg = model.config
    attn, experts = getattr(cfg, "_attn_implementation", None), getattr(cfg, "_experts_implementation", None)
    moe = getattr(model, "_can_set_experts_implementation", lambda: False)()
    try:
        cfg._attn_implementation = "eager"
        if moe:
            model.set_experts_implementation("batched_mm")
        yield
    finally:
        cfg._attn_implementation = attn
        if moe:
            model.set_experts_implementation(experts or "eager")


def export(model: torch.nn.Module, tokenizer, out: Path, dtype: str = "float32", log=print,
           layout: str = "root") -> dict:
    """Write out/model.onnx (or out/onnx/model.onnx for `layout` "onnx"; + model.onnx.data when
    large), the tokenizer, config.json, onnx_info.json (names, dtype, opset, sizes) and
    genai_config.json for onnxruntime-genai. Returns onnx_info."""
    import onnx

    kv = check_supported(model)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if dtype == "bfloat16":
        raise BakeError("--dtype bfloat16: ONNX Runtime's CPU kernels lack bfloat16; export float32 or float16")
    model = model.to(torch_dtype).eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    ins, outs = io_names(n_layers)
    # sample: batch 2, 3 new tokens after 4 cached ones, one left-padded row (so the traced graph
    # keeps the padding mask path)
    b, s, p = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = [torch.zeros(b, h, p, d, dtype=torch_dtype) for kh, kd, vh, vd in kv for h, d in ((kh, kd), (vh, vd))]
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for n in ins[3:]:
        dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in outs[1:]:
        dyn[n] = {0: "batch_size", 2: "total_sequence_length"}
    wrapper = WithPast(model).eval()  # a new Module trains by default: the exporter would leave the model in train mode
    rel = LAYOUTS[layout]
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with traceable(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        opset = trace(wrapper, (ids, mask, pos, *past), path, ins, outs, dyn, model.config.model_type)
    proto = onnx.load(str(path), load_external_data=True)
    ins = [i.name for i in proto.graph.input]  # the tracer drops an input the model never reads (ALiBi: position_ids)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = size > PROTOBUF_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data" if external else None)
    tokenizer.save_pretrained(str(out))
    cfg.save_pretrained(str(out))
    info = {"format": "onnx", "graph": rel, "external_data": external, "opset": opset, "dtype": dtype,
            "num_layers": n_layers, "kv_heads": kv[0][0], "head_dim": kv[0][1],
            "kv": [list(x) for x in kv], "inputs": ins, "outputs": outs,
            "export_seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(GRAPH))}
    (out / "onnx_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    genai = genai_config(cfg, info)
    if genai:
        (out / "genai_config.json").write_text(json.dumps(genai, indent=1) + "\n", encoding="utf-8")
    log(f"  onnx: {GRAPH} ({info['bytes'] / 1e6:.0f} MB, opset {opset}) in {info['export_seconds']} s")
    return info


def trace(wrapper, args: tuple, path: Path, ins: list, outs: list, dyn: dict, mt: str) -> int:
    """Write the graph with the TorchScript tracer (seconds); where it cannot trace the model's code
    (Cohere's interleaved rotary, for one), with torch.export and the dynamo exporter (onnxscript: slower,
    opset 18). Returns the opset; a model neither can export is one error naming both reasons."""
    try:
        torch.onnx.export(wrapper, args, str(path), input_names=ins, output_names=outs, dynamic_axes=dyn,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        rel = disagreement(wrapper, path, args)
        if rel <= AGREE_TOL[args[3].dtype]:
            return OPSET
        first = f"a graph that disagrees with PyTorch on another shape (relative logit error {rel:.2g})"
    except Exception as e:  # noqa: BLE001 - the tracer's failures have no common type
        first = _first_line(e)
    from torch.export import Dim

    auto = Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in args[3:]))
    try:
        prog = torch.onnx.export(wrapper, args, input_names=ins, output_names=outs, dynamic_shapes=shapes,
                                 opset_version=DYNAMO_OPSET, dynamo=True, verbose=False)
        prog.save(str(path))
    except Exception as e:  # noqa: BLE001
        raise BakeError(f"--format onnx: model type {mt!r} does not export: the TorchScript tracer gives "
                        f"{first}; the dynamo exporter says {_first_line(e, last=True)} (safetensors works)") from None
    rel = disagreement(wrapper, path, args)
    if rel > AGREE_TOL[args[3].dtype]:
        raise BakeError(f"--format onnx: model type {mt!r} does not export: the TorchScript tracer gives {first}; "
                        f"the dynamo exporter's graph disagrees too (relative logit error {rel:.2g}; safetensors works)")
    return DYNAMO_OPSET


AGREE_TOL = {torch.float32: 1e-4, torch.float16: 2e-2}  # the exporter's own check, before verify's


def disagreement(wrapper, path: Path, args: tuple) -> float:
    """Relative logit error of the written graph vs PyTorch on a shape other than the traced one (batch 1,
    5 new tokens after 2 cached, no padding): a trace that froze a data-dependent branch or a shape
    shows here, before verify."""
    from ..ort_session import open_session

    torch.manual_seed(0)
    past = [torch.randn(1, t.shape[1], 2, t.shape[3], dtype=t.dtype) for t in args[3:]]
    ids = torch.randint(0, wrapper.model.config.vocab_size, (1, 5))
    mask = torch.ones(1, 7, dtype=torch.int64)
    pos = torch.arange(2, 7)[None]
    ref = wrapper(ids, mask, pos, *past)[0].double()
    sess = open_session(path, "cpu")
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feed.update({n: t.numpy() for n, t in zip(io_names(len(past) // 2)[0][3:], past)})
    wanted = {i.name for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(["logits"], {k: v for k, v in feed.items() if k in wanted})[0]).double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _first_line(e: Exception, last: bool = False) -> str:
    """The line of an exporter's error that says what failed (the dynamo exporter's is under its
    "Exception summary" heading)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if last and "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    text = lines[0] if lines else type(e).__name__
    return (text.split(">: ", 1)[-1] if text.startswith("<class") else text)[:300]


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
