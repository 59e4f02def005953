"""Verify a GGUF in llama.cpp itself against the hooked reference.

- f32: relative logit error <= 1e-4 (llama.cpp's kernels round unlike PyTorch's) and identical greedy
  continuations; for a model with a tanh GELU (Gemma, GPT-2), whose llama.cpp CPU kernel reads an fp16
  table, against the hooked reference run with that table's GELU (`ggml_gelu`).
- a GGUF with its control-vector sidecar (`--format gguf,control-vector`): the two together, the vector
  at scale 1, by the same yardsticks.
- any other type (f16, q8_0, q4_k_m, ...): quantization adds its own error, so the yardstick is the
  unsteered model's own error at that type: the unsteered float checkpoint is written and quantized
  the same way, and both run on the reference's sequences. Passes when the steered model's max abs
  logit error vs the hooked reference is at most `FACTOR` x the unsteered model's vs the unsteered
  float model, and the steering survives: KL(steered-quantized ‖ original-quantized) is at least half
  of KL(steered ‖ original) in float32 (mean over every position's next-token distribution).
- a control vector: on the f32 GGUF of the unsteered model at scale 1, by the f32 yardstick.
- a llama.cpp LoRA (`lora/adapter-F32.gguf`): on the f32 GGUF of the unsteered model, at scale 1 by the
  f32 yardstick against the hooked reference, and at scale 0 equal to the unsteered GGUF (relative
  logit error <= 1e-4).

The GGUF's report also names the tensor types llama.cpp actually wrote (`tensor_types`, read back from
the file: its quantizer falls back to another type where a row is too narrow for the one asked for)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from .verify import errors, logits_batch, run_candidate

FACTOR = 1.5
F32_TOL = 1e-4


def lora_gguf_runnable(model_dir) -> bool:
    """llama.cpp can run a LoRA on the unsteered model: llama-cpp-python is installed, and the source is a
    GGUF (its tokenizer metadata makes the base GGUF) or a transformers directory llama.cpp's converter
    writes (architecture and tokenizer). bake writes a llama.cpp LoRA only then: it is verified where it
    is written."""
    import importlib.util

    from .errors import BakeError
    from .exporters import gguf_convert
    from .exporters.gguf_lm import source_gguf

    if not isinstance(model_dir, Path) or importlib.util.find_spec("llama_cpp") is None:
        return False
    if source_gguf(model_dir, "--format lora") is not None:
        return True
    try:
        gguf_convert.check(model_dir, "--format lora")
    except BakeError:
        return False
    return (gguf_convert.home() / "convert_lora_to_gguf.py").is_file()


def lora_gguf_verifiable(baked: Path, model_dir) -> bool:
    """A llama.cpp LoRA GGUF bake wrote in `baked`, which llama.cpp can run on the unsteered model."""
    return (Path(baked) / "lora" / "adapter-F32.gguf").is_file() and lora_gguf_runnable(model_dir)


def verify_gguf(load_original, specs, ref: list[dict], baked_dir: Path, model_dir: Path, adapter,
                max_new_tokens: int) -> dict:
    from .artifacts import open_artifact

    from .exporters.gguf_lm import fallback, file_type, tensor_types

    cand = open_artifact(baked_dir, "gguf", flag="--baked")
    file = cand.model.file
    kind, types = file_type(file), tensor_types(file)
    vector = cand.model.control_vector
    got = run_candidate(cand.model, cand.tokenizer, ref, max_new_tokens, desc="baked (gguf, llama.cpp)")
    del cand
    report = {"gguf_type": kind, "tensor_types": types, **_f32_judged(ref, got)}
    if vector:
        report["control_vector"] = f"{vector.name} (the sidecar, at scale 1)"
    fell = fallback(kind, types)
    if fell:
        report["note"] = fell
    if kind == "f32" and report["passed"]:
        return report
    if kind == "f32" and report["greedy_same"] == report["prompts"]:  # beyond 1e-4: llama.cpp's own rounding?
        return _f32_ggml_gelu(report, load_original, specs, ref, got, model_dir, adapter)
    if kind == "f32":
        return report
    max_abs = report["max_abs"]
    from .exporters.gguf_imatrix import beside

    imatrix = beside(file)
    report.update(_yardstick(load_original, ref, got, model_dir, adapter, kind, max_new_tokens, imatrix))
    if imatrix:
        report["imatrix"] = f"imatrix.gguf ({len(imatrix)} tensors; the unsteered model quantized with it too)"
    survives = report["kl_quantized"] >= 0.5 * report["kl_float32"]
    report["passed"] = max_abs <= FACTOR * report["unsteered_max_abs"] and survives
    report["criterion"] = (f"max abs logit error <= {FACTOR:g} x the unsteered model's own at {kind} "
                           f"({report['unsteered_max_abs']:.3g}), and KL(steered ‖ original) at {kind} >= half "
                           f"of it in float32 ({report['kl_float32']:.3g})")
    if survives and _on_grid(model_dir, kind) and (file.parent / "config.json").is_file():
        _judge_on_grid(report, load_original, specs, ref, file, model_dir, adapter, vector, max_new_tokens)
    return report


def _on_grid(model_dir: Path, kind: str) -> bool:
    """The source is a GGUF of type `kind`: its dequantized weights sit on llama.cpp's grid for that type, so
    requantizing the unsteered model costs almost nothing and the yardstick above is biased low."""
    from .exporters.gguf_lm import file_type, source_gguf

    src = source_gguf(model_dir) if isinstance(model_dir, Path) else None
    return src is not None and file_type(src) == kind


def _judge_on_grid(report: dict, load_original, specs, ref, file: Path, model_dir: Path, adapter, vector,
                   n: int) -> None:
    """For a source quantized at the requested type: the baked checkpoint beside the GGUF, converted again
    at f32 the same way (added all-zero biases left out, the sidecar applied), is run in llama.cpp by the
    f32 rule and reported (`f32_conversion`). Where the yardstick fails it, the GGUF passes when that f32
    conversion does: the quantized file then differs from it by llama.cpp's quantization alone, and the
    steering survives it (KL, checked by the caller)."""
    from transformers import AutoTokenizer

    from .exporters import gguf_lm
    from .exporters.gguf_biases import source_biases, written_biases
    from .llamacpp import LlamaCppLM

    ckpt = file.parent
    zero = {k for k, t in written_biases(ckpt).items() if k not in source_biases(model_dir) and not bool(t.any())}
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as tmp:
        gguf_lm.write(ckpt, model_dir, Path(tmp), "f32", adapter, log=lambda *_: None, drop=zero)
        (Path(tmp) / "config.json").write_bytes((ckpt / "config.json").read_bytes())
        lm = LlamaCppLM(tmp, control_vector=vector)
        got = run_candidate(lm, AutoTokenizer.from_pretrained(str(ckpt)), ref, n, desc="baked at f32 (llama.cpp)")
        del lm
    f32 = {"gguf_type": "f32", **_f32_judged(ref, got)}
    if not f32["passed"] and f32["greedy_same"] == f32["prompts"]:
        f32 = _f32_ggml_gelu(f32, load_original, specs, ref, got, model_dir, adapter)
    report["f32_conversion"] = {k: f32[k] for k in ("max_rel", "greedy_same", "prompts", "passed", "criterion")}
    if report["passed"] or not f32["passed"]:
        return
    report["passed"] = True
    report["criterion"] = (f"the source GGUF is {report['gguf_type']} already (requantizing the unsteered model "
                           f"costs {report['unsteered_max_abs']:.3g}: the yardstick is biased low), so the baked "
                           f"checkpoint converted at f32 must run as the hooked reference ({f32['criterion']}: "
                           f"{f32['max_rel']:.3g}), and KL(steered ‖ original) at {report['gguf_type']} >= half of "
                           f"it in float32 ({report['kl_float32']:.3g})")


def with_sidecar(part: dict, whole: dict) -> dict:
    """One report for `--format gguf,control-vector`: `part` (the other formats against the specs baked,
    without the layer-output shifts) with `whole` (the GGUF and its sidecar against the whole spec) under
    "gguf"."""
    part = dict(part)
    part["gguf"] = whole.get("gguf", whole)
    part["without"] = "the layer-output shifts (in control-vector.gguf, the GGUF's sidecar)"
    part["passed"] = part["passed"] and whole["passed"]
    return part


def has_sidecar(baked: Path) -> bool:
    """A baked directory whose GGUF runs with a control-vector sidecar (`--format gguf,control-vector`)."""
    from .errors import BakeError
    from .exporters.control_vector import sidecar
    from .llamacpp import gguf_in

    try:
        return Path(baked).is_dir() and sidecar(gguf_in(Path(baked))) is not None
    except BakeError:  # no model-*.gguf, or several
        return False


GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUFastActivation")  # tanh-approximated GELU


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU (ggml-cpu/vec.h, GGML_GELU_FP16, always defined): the input rounded to fp16
    indexes a table of fp16(0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))); 0 below −10, x above 10."""
    h = x.float().half().float()
    y = (0.5 * h * (1 + torch.tanh(0.7978845608028654 * h * (1 + 0.044715 * h * h)))).half().float()
    return torch.where(x <= -10, torch.zeros_like(y), torch.where(x >= 10, x.float(), y)).to(x.dtype)


def _f32_ggml_gelu(report: dict, load_original, specs, ref: list[dict], got: list[dict], model_dir: Path,
                   adapter) -> dict:
    """An f32 GGUF beyond 1e-4 with identical greedy continuations, of a model with a tanh GELU: llama.cpp
    computes that GELU from an fp16 table (`ggml_gelu`: 8e-4 relative on a tiny random Gemma-3 by itself).
    The hooked reference is run again with that GELU (forward hooks on the activation modules), and so is
    the unsteered model beside the unsteered f32 GGUF: the GGUF passes within 1e-4 of the table's
    reference, or within FACTOR x the unsteered model's own distance where that is larger (llama.cpp's
    other kernels: 1.4e-4 on that Gemma-3)."""
    from .llamacpp import LlamaCppLM

    model, tok = load_original()
    acts = [m for m in model.modules() if type(m).__name__ in GELU_TANH]
    if not acts:
        return report
    hooks = [m.register_forward_hook(lambda mod, args, out: ggml_gelu(args[0])) for m in acts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [r["seq"] for r in ref]
    plain = [{"logits": lg} for lg in logits_batch(model, seqs, pad)]
    from .runtime import steered

    with steered(model, specs, check_model=False):
        table = [{"logits": lg} for lg in logits_batch(model, seqs, pad)]
    for h in hooks:
        h.remove()
    del model
    with _unsteered_gguf(model_dir, adapter, "f32") as tmp:
        lm = LlamaCppLM(tmp)
        plain_cpp = [{"logits": lm.prefill_then_decode_logits(r["seq"], r["n_prompt"])} for r in ref]
        del lm
    _, rel, _ = errors(table, got)
    _, own, _ = errors(plain, plain_cpp)
    bound = max(F32_TOL, FACTOR * own)
    report.update(ggml_gelu_max_rel=rel, unsteered_ggml_gelu_max_rel=own,
                  passed=rel <= bound and report["greedy_same"] == report["prompts"])
    report["criterion"] = (f"against the hooked reference run with llama.cpp's fp16-table GELU, relative logit error "
                           f"{rel:.3g} <= max({F32_TOL:g}, {FACTOR:g} x the unsteered model's own {own:.3g}) "
                           f"({report['max_rel']:.3g} against the exact GELU), and identical greedy continuations")
    return report


def verify_control_vector(ref: list[dict], baked_dir: Path, model_dir: Path, adapter, max_new_tokens: int) -> dict:
    """The control vector in `baked_dir`, applied at scale 1 by llama.cpp to the unsteered f32 GGUF."""
    from transformers import AutoTokenizer

    from .exporters.control_vector import FILE
    from .llamacpp import LlamaCppLM

    with _unsteered_gguf(model_dir, adapter, "f32") as base:
        lm = LlamaCppLM(base, control_vector=Path(baked_dir) / FILE, control_scale=1.0)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        got = run_candidate(lm, tok, ref, max_new_tokens, desc="control vector (llama.cpp)")
        del lm
    report = {"scale": 1.0, **_f32_judged(ref, got)}
    report["criterion"] = "on the unsteered f32 GGUF at scale 1: " + report["criterion"]
    return report


def verify_lora_gguf(ref: list[dict], baked_dir: Path, model_dir: Path, adapter, max_new_tokens: int) -> dict:
    """The llama.cpp LoRA in `baked_dir/lora` on the unsteered f32 GGUF: at scale 1 the hooked reference
    (f32 yardstick), at scale 0 the unsteered GGUF itself."""
    from transformers import AutoTokenizer

    from .exporters.lora import DIR
    from .llamacpp import LlamaCppLM

    adapter_file = Path(baked_dir) / DIR / "adapter-F32.gguf"
    with _unsteered_gguf(model_dir, adapter, "f32") as base:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        lm = LlamaCppLM(base, lora=adapter_file, lora_scale=1.0)
        got = run_candidate(lm, tok, ref, max_new_tokens, desc="LoRA (llama.cpp, scale 1)")
        del lm
        runs = {}
        for name, scale in (("plain", None), ("zero", 0.0)):
            lm = LlamaCppLM(base) if scale is None else LlamaCppLM(base, lora=adapter_file, lora_scale=scale)
            runs[name] = [{"logits": lm.prefill_then_decode_logits(r["seq"], r["n_prompt"])} for r in ref]
            del lm
    report = {"file": f"{DIR}/{adapter_file.name}", "scale": 1.0, **_f32_judged(ref, got)}
    _, zero_rel, _ = errors(runs["plain"], runs["zero"])
    report["scale0_max_rel"] = zero_rel
    report["passed"] = report["passed"] and zero_rel <= F32_TOL
    report["criterion"] = (f"on the unsteered f32 GGUF: at scale 1 {report['criterion']}; at scale 0 relative logit "
                           f"error <= {F32_TOL:g} vs the unsteered GGUF ({zero_rel:.3g})")
    return report


def _f32_judged(ref: list[dict], got: list[dict]) -> dict:
    """llama.cpp's run vs the reference by the f32 yardstick (errors, greedy agreement, pass)."""
    max_abs, max_rel, _ = errors(ref, got)
    same = sum(bool(torch.equal(r["seq"], g["seq"])) for r, g in zip(ref, got))
    return {"runtime": "llama.cpp", "prompts": len(ref), "max_abs": max_abs, "max_rel": max_rel, "greedy_same": same,
            "greedy_generated": sum(g["greedy_run"] for g in got), "passed": max_rel <= F32_TOL and same == len(ref),
            "criterion": f"relative logit error <= {F32_TOL:g} and identical greedy continuations"}


@contextlib.contextmanager
def _unsteered_gguf(model_dir: Path, adapter, kind: str, imatrix: dict | None = None):
    """A temporary directory holding the unsteered model as model-<KIND>.gguf (quantized with the steered
    GGUF's importance matrix, where it had one), with its config.json."""
    from .exporters import gguf_lm

    with tempfile.TemporaryDirectory(dir=Path(model_dir).parent) as tmp:
        gguf_lm.write(Path(model_dir), Path(model_dir), Path(tmp), kind, adapter, log=lambda *_: None,
                      imatrix=imatrix)
        (Path(tmp) / "config.json").write_bytes((Path(model_dir) / "config.json").read_bytes())
        yield Path(tmp)


def _yardstick(load_original, ref, got, model_dir: Path, adapter, kind: str, n: int, imatrix=None) -> dict:
    """The unsteered model in float32 (PyTorch) and at `kind` (llama.cpp) on the reference's sequences."""
    from .llamacpp import LlamaCppLM

    model, tok = load_original()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [r["seq"] for r in ref]
    plain = [{"logits": lg} for lg in logits_batch(model, seqs, pad)]
    del model
    with _unsteered_gguf(model_dir, adapter, kind, imatrix) as tmp:
        orig_q = LlamaCppLM(tmp)
        plain_q = [{"logits": orig_q.prefill_then_decode_logits(r["seq"], r["n_prompt"])} for r in ref]
        del orig_q
    e_abs, e_rel, _ = errors(plain, plain_q)
    return {"unsteered_max_abs": e_abs, "unsteered_max_rel": e_rel,
            "kl_float32": _kl(ref, plain), "kl_quantized": _kl(got, plain_q)}


def _kl(steered: list[dict], original: list[dict]) -> float:
    """Mean over positions of KL(p_steered ‖ p_original) of the next-token distributions."""
    tot, count = 0.0, 0
    for s, o in zip(steered, original):
        ls, lo = torch.log_softmax(s["logits"].double(), -1), torch.log_softmax(o["logits"].double(), -1)
        tot += float((ls.exp() * (ls - lo)).sum(-1).sum())
        count += ls.shape[0]
    return tot / max(count, 1)
