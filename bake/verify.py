"""verify: a baked model, loaded from disk as a user would, against the hooked reference.

On every probe prompt: greedy continuation from each model, then logits of both models over the
prompt plus the reference continuation (prefill and decode positions alike). PyTorch models run the
probes in left-padded batches of `BATCH` (attention mask, explicit position ids), reference and
candidate alike; an ONNX candidate runs them one at a time through its KV-cache loop. The candidate's
greedy continuation is read off its logits where they prove it (`bake/greedy.py`), generated elsewhere. float32 passes when
every greedy continuation is identical and the relative logit error (max |Δ| / max |reference
logit|) is ≤ 1e-5. Models with a wide dynamic range (Gemma) carry more float32 rounding noise than
that; there verify also runs the hooked reference in float64 and passes when the baked model is as
exact as the hooked float32 model itself: its error vs float64 at most `NOISE_FACTOR` times the
hooked float32 model's. Lower precisions are judged the same way against the hooked model's own
error at that precision (cast to that dtype) vs the float32 reference. The float64 fallback and
`NOISE_FACTOR` are `bake/yardstick.py`'s, shared with verify_pipeline; candidates are opened by
`bake/artifacts.py`, as diff and eval open theirs.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import check_lora, formats_in, open_artifact
from .errors import BakeError
from .greedy import eos_masked, settled
from .runtime import steered
from .spec import Spec
from .yardstick import NOISE_FACTOR, float64_verdict, fresh_run, within_noise

PROBES = [
    "The capital of France is",
    "Write a short note to a colleague about the meeting tomorrow.",
    "Once upon a time, in a small village by the sea,",
    "People who disagree with me are",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Here is what I think about my neighbours:",
    "Photosynthesis converts light into",
]
REL_TOL = 1e-5
__all__ = ["NOISE_FACTOR", "PROBES", "REL_TOL", "formats_in", "read_prompts", "verify"]


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a UTF-8 file, one per non-empty line ([] without a file); a bad file is one error."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise BakeError(f"--prompts: no such file {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BakeError(f"--prompts: {str(p)!r} is not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise BakeError(f"--prompts: {str(p)!r} holds no prompts (one per line)")
    return lines


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int) -> torch.Tensor:
    """Prompt ids followed by n greedy tokens (EOS not allowed to stop early)."""
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id)
    return out[0].cpu()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of one unpadded sequence, float64 on the CPU."""
    return model(ids[None].to(model.device)).logits[0].double().cpu()


BATCH = 8  # probes per padded batch


def _left_pad(seqs: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    return ids, mask


@torch.no_grad()
def greedy_batch(model, tok, prompts: list[str], n: int) -> list[torch.Tensor]:
    """Prompt ids followed by n greedy tokens, for a left-padded batch of prompts (EOS not allowed to stop
    early). One decode loop for the batch: decoding is memory-bound, so a batch of 8 costs about one."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [tok(p, return_tensors="pt").input_ids[0] for p in prompts]
    ids, mask = _left_pad(enc, pad)
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=pad)
    return [torch.cat([e, out[i, ids.shape[1]:].cpu()]) for i, e in enumerate(enc)]


@torch.no_grad()
def logits_batch(model, seqs: list[torch.Tensor], pad: int) -> list[torch.Tensor]:
    """Teacher-forced logits over each sequence, in one left-padded forward (explicit position ids, so
    that every real token sits where it sits alone)."""
    ids, mask = _left_pad(seqs, pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = model.device
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)).logits.double().cpu()
    return [out[i, ids.shape[1] - len(s):] for i, s in enumerate(seqs)]


def batches(items: list, size: int = BATCH):
    """`items` in consecutive chunks of `size`."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_reference(model, tok, specs: list[Spec], prompts: list[str], n: int, check_model: bool = True,
                  desc: str = "reference") -> list[dict]:
    """The hooked reference on every prompt: greedy continuation, then logits over prompt + continuation;
    a spec that breaks the model (NaN or Inf logits) is a BakeError."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with steered(model, specs, check_model=check_model):
        out = []
        for chunk in tqdm(batches(prompts), desc=desc, leave=False):
            seqs = greedy_batch(model, tok, chunk, n)
            for p, seq, lg in zip(chunk, seqs, logits_batch(model, seqs, pad)):
                out.append({"prompt": p, "n_prompt": len(seq) - n, "seq": seq, "logits": lg})
    bad = nonfinite(out)
    if bad:
        raise BakeError(f"--strength/spec: the hooked reference itself gives NaN or Inf logits on {bad}/{len(out)} "
                        f"probe prompts: at these strengths the spec breaks the model (lower the strength)")
    if all(bool((r["logits"].amax(-1) == r["logits"].amin(-1)).all()) for r in out):
        raise BakeError("--strength/spec: the hooked reference gives the same logit to every token at every "
                        "position of every probe: the spec erases the model's output at these strengths, and a "
                        "comparison with it would prove nothing (lower the strength)")
    return out


def run_candidate(model, tok, ref: list[dict], n: int, desc: str, run_greedy: bool = False) -> list[dict]:
    """Teacher-forced logits of a candidate over the reference's sequences (a PyTorch model in left-padded
    batches like the reference, an ONNX or llama.cpp one prompt by prompt along its KV-cache path), and
    its greedy continuations: read off those logits where they prove it generates the reference's
    (`bake.greedy`), generated for real on the other prompts (all of them with `run_greedy`). Each
    result says which (`greedy_run`)."""
    eos = None if run_greedy else eos_masked(model)
    exact_path = hasattr(model, "prefill_then_decode_logits")
    if exact_path:
        got = [{"logits": model.prefill_then_decode_logits(r["seq"], r["n_prompt"])} for r in tqdm(ref, desc=desc, leave=False)]
    else:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        got = [{"logits": lg} for chunk in tqdm(batches(ref), desc=desc, leave=False)
               for lg in logits_batch(model, [r["seq"] for r in chunk], pad)]
    todo = []
    for r, g in zip(ref, got):
        g["greedy_run"] = eos is None or not settled(r, g["logits"], eos, exact_path)
        if g["greedy_run"]:
            todo.append((r, g))
        else:
            g["seq"] = r["seq"]
    for chunk in batches(todo):
        if exact_path:
            seqs = [greedy(model, tok, r["prompt"], n) for r, _ in chunk]
        else:
            seqs = greedy_batch(model, tok, [r["prompt"] for r, _ in chunk], n)
        for (_, g), s in zip(chunk, seqs):
            g["seq"] = s
    return got


def errors(ref: list[dict], got: list[dict]) -> tuple[float, float, list[float]]:
    """Max abs and relative logit error over prompts, NaN-aware: a non-finite logit anywhere counts as an
    infinite error (Python's max() would drop a NaN; all-NaN models would even agree on greedy tokens)."""
    max_abs, max_rel, per = 0.0, 0.0, []
    for r, g in zip(ref, got):
        finite = bool(torch.isfinite(g["logits"]).all()) and bool(torch.isfinite(r["logits"]).all())
        d = (r["logits"] - g["logits"]).abs().max().item() if finite else math.inf
        scale = r["logits"].abs().max().item()
        rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
        per.append(d)
        max_abs, max_rel = max(max_abs, d), max(max_rel, rel)
    return max_abs, max_rel, per


def nonfinite(runs: list[dict]) -> int:
    """How many runs (prompts) hold a NaN or Inf logit."""
    return sum(not bool(torch.isfinite(r["logits"]).all()) for r in runs)


RUNTIME_CHECKED = ("gguf", "control-vector")  # run in llama.cpp by apply (`runtime`), not opened here


def verify(load_original, specs: list[Spec], baked_dir: Path, prompts: list[str] | None = None,
           max_new_tokens: int = 32, check_model: bool = True, formats: list[str] | None = None,
           provider: str = "auto", trust_code: bool = False, runtime: dict | None = None,
           device: str = "cpu", device_map: str | None = None) -> dict:
    """`load_original()` returns a fresh (model, tokenizer) of the unmodified float32 model (on the
    device it should run on); safetensors candidates open on `device` or spread by `device_map`. The
    reference runs first and is freed (its logits kept) before each candidate loads, so one copy of
    the model is resident at a time. Every
    format in the directory (safetensors, ONNX, GGUF) is checked against one hooked reference run; the
    report is the first format's, with the others under their names, and passes when all do.
    `runtime[fmt](ref)` checks a format bake runs in another runtime where it wrote it (a GGUF, a control
    vector: llama.cpp, `bake.verify_gguf`)."""
    baked_dir = Path(baked_dir)
    formats = formats or formats_in(baked_dir)
    runtime = runtime or {}
    formats = [f for f in formats if f in runtime or f not in RUNTIME_CHECKED]  # checked where bake wrote them
    if not formats:
        raise BakeError(f"--baked: {str(baked_dir)!r}: nothing this verify can run (a control vector is verified "
                        f"by bake apply --format control-vector)")
    if "lora" in formats:
        check_lora(baked_dir)  # a malformed adapter, or a pickled one: refused before any work
    prompts = PROBES + list(prompts or [])
    model, tok = load_original()
    ref = run_reference(model, tok, specs, prompts, max_new_tokens, check_model)
    del model
    gc.collect()
    load_at = _at_dtype(load_original)
    reports, shared = {}, {}  # shared: the yardstick runs, computed once for all formats
    for fmt in formats:
        if fmt in runtime:
            reports[fmt] = runtime[fmt](ref)
            continue
        cand = open_artifact(baked_dir, fmt, provider=provider, trust_code=trust_code, dtype="auto", flag="--baked",
                             device=device, device_map=device_map)
        reports[fmt] = _check(load_at, specs, ref, cand, prompts, max_new_tokens, shared)
        if fmt == "onnx":
            reports[fmt]["provider"] = cand.runtime
        del cand
        gc.collect()
    report = dict(reports[formats[0]])
    report["format"], report["format_passed"] = formats[0], reports[formats[0]]["passed"]
    for fmt in formats[1:]:
        report[fmt] = reports[fmt]
    report["passed"] = all(r["passed"] for r in reports.values())
    return report


def _at_dtype(load_original):
    """`load_original` in the yardstick's loader contract: `load_at(dtype)` → a fresh (model, tokenizer)."""
    def load_at(dtype: torch.dtype):
        model, tok = load_original()
        return model.to(dtype), tok

    return load_at


def _check(load_at, specs, ref, cand, prompts, max_new_tokens: int, shared: dict) -> dict:
    """One candidate (an `Artifact`) against the reference: float32 by `REL_TOL` (or the float64 yardstick),
    another dtype by the hooked model's own error at that dtype; never a pass with a NaN or Inf logit."""
    noise = None if cand.dtype == "float32" else _own_noise(load_at, specs, ref, max_new_tokens, cand.dtype, shared)
    got = run_candidate(cand.model, cand.tokenizer, ref, max_new_tokens, desc=f"baked ({cand.format})")
    max_abs, max_rel, per = errors(ref, got)
    same = [bool(torch.equal(r["seq"], g["seq"])) for r, g in zip(ref, got)]
    report = {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "dtype": cand.dtype,
        "max_abs": max_abs, "max_rel": max_rel, "greedy_same": sum(same), "nonfinite": nonfinite(got),
        "greedy_generated": sum(g["greedy_run"] for g in got),
        "per_prompt": [{"prompt": r["prompt"], "max_abs": e, "greedy_same": s} for r, e, s in zip(ref, per, same)],
    }
    if noise is None:
        report.update(_judge_fp32(load_at, specs, ref, got, max_rel, all(same), max_new_tokens, shared))
    else:
        report["hooked_noise_max_abs"], report["hooked_noise_max_rel"] = noise[0], noise[1]
        report["criterion"] = (f"max abs logit error <= {NOISE_FACTOR:g} x the hooked model's own error at "
                               f"{report['dtype']} ({noise[0]:.3g})")
        report["passed"] = within_noise(max_abs, noise[0])
    if report["nonfinite"]:  # never a pass, whatever the yardstick said
        report["passed"] = False
        report["criterion"] = f"the baked model gives NaN or Inf logits on {report['nonfinite']} prompt(s)"
    return report


def _own_noise(load_at, specs, ref, n: int, dtype: str, shared: dict) -> tuple[float, float, list[float]]:
    """The hooked model's own error at `dtype` vs the float32 reference (once per dtype): the yardstick
    for a baked model stored at that dtype."""
    if ("noise", dtype) not in shared:
        run = lambda m: errors(ref, run_candidate_hooked(m[0], m[1], specs, ref, n))  # noqa: E731
        shared[("noise", dtype)] = fresh_run(load_at, getattr(torch, dtype), run)
    return shared[("noise", dtype)]


def _judge_fp32(load_at, specs, ref, got, max_rel: float, same: bool, n: int, shared: dict) -> dict:
    """float32: relative error within `REL_TOL` and identical greedy continuations; above `REL_TOL` with
    identical continuations, is it the model's own float32 noise? Both are compared with the exact
    (float64) answer (the yardstick's fallback)."""
    out = {"criterion": f"relative logit error <= {REL_TOL:g} and identical greedy continuations",
           "passed": max_rel <= REL_TOL and same}
    if same and max_rel > REL_TOL:
        exact = lambda m: run_candidate_hooked(m[0], m[1], specs, ref, n, logits_only=True)  # noqa: E731
        verdict = float64_verdict(load_at, exact, lambda e, x: errors(e, x)[0], ref, got, "max_abs", shared)
        out.update(verdict)
        out["criterion"] = (f"identical greedy continuations and error vs the float64 reference <= "
                            f"{NOISE_FACTOR:g} x the hooked float32 model's own "
                            f"({verdict['hooked_fp32_vs_fp64_max_abs']:.3g})")
    return out


def run_candidate_hooked(model, tok, specs, ref, n, logits_only: bool = False) -> list[dict]:
    """The hooked model (cast to another precision) run like a candidate; logits only for the float64 run.
    The fingerprint was checked at float32 above; the cast model's bytes differ by design."""
    with steered(model, specs, check_model=False):
        if logits_only:
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            return [{"logits": lg} for chunk in tqdm(batches(ref), desc="hooked, float64", leave=False)
                    for lg in logits_batch(model, [r["seq"] for r in chunk], pad)]
        return run_candidate(model, tok, ref, n, desc="hooked, other precision")
