"""verify: a baked model, loaded from disk as a user would, against the hooked reference.

On every probe prompt: greedy continuation from each model, then logits of both models over the
prompt plus the reference continuation (prefill and decode positions alike). PyTorch models run the
probes in left-padded batches of `BATCH` (attention mask, explicit position ids), reference and
candidate alike; an ONNX candidate runs them one at a time through its KV-cache loop. float32 passes when
every greedy continuation is identical and the relative logit error (max |Δ| / max |reference
logit|) is ≤ 1e-5. Models with a wide dynamic range (Gemma) carry more float32 rounding noise than
that; there verify also runs the hooked reference in float64 and passes when the baked model is as
exact as the hooked float32 model itself: its error vs float64 at most `NOISE_FACTOR` times the
hooked float32 model's. Lower precisions are judged the same way against the hooked model's own
error at that precision (cast to that dtype) vs the float32 reference.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import BakeError
from .runtime import steered
from .spec import Spec

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
NOISE_FACTOR = 1.5


def read_prompts(path: str | Path | None) -> list[str]:
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
    return model(ids[None].to(model.device)).logits[0].double().cpu()


BATCH = 8  # probes per padded batch


def _left_pad(seqs: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _batches(items: list, size: int = BATCH):
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_reference(model, tok, specs: list[Spec], prompts: list[str], n: int, check_model: bool = True,
                  desc: str = "reference") -> list[dict]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with steered(model, specs, check_model=check_model):
        out = []
        for chunk in tqdm(_batches(prompts), desc=desc, leave=False):
            seqs = greedy_batch(model, tok, chunk, n)
            for p, seq, lg in zip(chunk, seqs, logits_batch(model, seqs, pad)):
                out.append({"prompt": p, "n_prompt": len(seq) - n, "seq": seq, "logits": lg})
    bad = nonfinite(out)
    if bad:
        raise BakeError(f"--strength/spec: the hooked reference itself gives NaN or Inf logits on {bad}/{len(out)} "
                        f"probe prompts: at these strengths the spec breaks the model (lower the strength)")
    return out


def run_candidate(model, tok, ref: list[dict], n: int, desc: str) -> list[dict]:
    if not hasattr(model, "prefill_then_decode_logits"):  # a PyTorch model: batched like the reference
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = []
        for chunk in tqdm(_batches(ref), desc=desc, leave=False):
            seqs = greedy_batch(model, tok, [r["prompt"] for r in chunk], n)
            out += [{"seq": s, "logits": lg} for s, lg in zip(seqs, logits_batch(model, [r["seq"] for r in chunk], pad))]
        return out
    out = []
    for r in tqdm(ref, desc=desc, leave=False):
        seq = greedy(model, tok, r["prompt"], n)
        if hasattr(model, "prefill_then_decode_logits"):  # ONNX: the prompt at once, then decode steps
            lg = model.prefill_then_decode_logits(r["seq"], r["n_prompt"])
        else:
            lg = logits(model, r["seq"])
        out.append({"seq": seq, "logits": lg})
    return out


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


def formats_in(baked_dir: Path) -> list[str]:
    """What a bake output directory holds: safetensors weights and/or an ONNX graph."""
    from .ort import is_onnx_dir

    found = []
    if any(baked_dir.glob("*.safetensors")):
        found.append("safetensors")
    if is_onnx_dir(baked_dir):
        found.append("onnx")
    if not found:
        raise BakeError(f"--baked: {str(baked_dir)!r} holds neither safetensors weights nor model.onnx")
    return found


def _load_candidate(fmt: str, baked_dir: Path, provider: str = "auto", trust_code: bool = False):
    if fmt == "onnx":
        from .ort import load_onnx

        model, tok = load_onnx(baked_dir, provider)
        return model, tok, str(model.dtype.__name__)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modules import CODE, needs_code

    if needs_code(baked_dir) and not trust_code:
        raise BakeError(f"--baked: {str(baked_dir)!r} carries generated code ({CODE}, for inserted modules); "
                        f"read it, then pass --trust-remote-code to run it")
    try:
        baked = AutoModelForCausalLM.from_pretrained(str(baked_dir), dtype="auto", trust_remote_code=trust_code,
                                                     use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(baked_dir), trust_remote_code=False)
    except Exception as e:
        raise BakeError(f"--baked: cannot load {str(baked_dir)!r} with stock from_pretrained: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    baked.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return baked, tok, str(baked.dtype).replace("torch.", "")


def verify(load_original, specs: list[Spec], baked_dir: Path, prompts: list[str] | None = None,
           max_new_tokens: int = 32, check_model: bool = True, formats: list[str] | None = None,
           provider: str = "auto", trust_code: bool = False) -> dict:
    """`load_original()` returns a fresh (model, tokenizer) of the unmodified float32 model. Every
    format in the directory (safetensors, ONNX) is checked against one hooked reference run; the
    report is the first format's, with the others under their names, and passes when all do."""
    baked_dir = Path(baked_dir)
    formats = formats or formats_in(baked_dir)
    prompts = PROBES + list(prompts or [])
    model, tok = load_original()
    ref = run_reference(model, tok, specs, prompts, max_new_tokens, check_model)
    del model
    gc.collect()
    reports, shared = {}, {}  # shared: the yardstick runs, computed once for all formats
    for fmt in formats:
        cand, cand_tok, dtype = _load_candidate(fmt, baked_dir, provider, trust_code)
        reports[fmt] = _check(load_original, specs, ref, cand, cand_tok, dtype, prompts, max_new_tokens, fmt, shared)
        if fmt == "onnx":
            reports[fmt]["provider"] = cand.provider
        del cand
        gc.collect()
    report = dict(reports[formats[0]])
    report["format"] = formats[0]
    for fmt in formats[1:]:
        report[fmt] = reports[fmt]
    report["passed"] = all(r["passed"] for r in reports.values())
    return report


def _check(load_original, specs, ref, cand, cand_tok, dtype: str, prompts, max_new_tokens: int, fmt: str,
           shared: dict) -> dict:
    noise = None
    if dtype != "float32":
        # the hooked model's own error at this dtype: the yardstick for the baked one
        if ("noise", dtype) not in shared:
            model, tok = load_original()
            model.to(getattr(torch, dtype))
            shared[("noise", dtype)] = errors(ref, run_candidate_hooked(model, tok, specs, ref, max_new_tokens))
            del model
            gc.collect()
        noise = shared[("noise", dtype)]
    got = run_candidate(cand, cand_tok, ref, max_new_tokens, desc=f"baked ({fmt})")
    max_abs, max_rel, per = errors(ref, got)
    same = [bool(torch.equal(r["seq"], g["seq"])) for r, g in zip(ref, got)]
    report = {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "dtype": dtype,
        "max_abs": max_abs, "max_rel": max_rel, "greedy_same": sum(same), "nonfinite": nonfinite(got),
        "per_prompt": [{"prompt": r["prompt"], "max_abs": e, "greedy_same": s} for r, e, s in zip(ref, per, same)],
    }
    if noise is None:
        report["criterion"] = f"relative logit error <= {REL_TOL:g} and identical greedy continuations"
        report["passed"] = max_rel <= REL_TOL and all(same)
        if all(same) and max_rel > REL_TOL:
            # is it the model's own float32 noise? compare both with the exact (float64) answer
            if "exact" not in shared:
                model, tok = load_original()
                shared["exact"] = run_candidate_hooked(model.double(), tok, specs, ref, max_new_tokens, logits_only=True)
                del model
                gc.collect()
            exact = shared["exact"]
            own = errors(exact, ref)
            baked_err = errors(exact, got)
            report.update({"exact_ref": "hooked float64", "hooked_fp32_vs_fp64_max_abs": own[0],
                           "baked_vs_fp64_max_abs": baked_err[0]})
            report["criterion"] = (f"identical greedy continuations and error vs the float64 reference <= "
                                   f"{NOISE_FACTOR:g} x the hooked float32 model's own ({own[0]:.3g})")
            report["passed"] = baked_err[0] <= NOISE_FACTOR * own[0]
    else:
        report["hooked_noise_max_abs"], report["hooked_noise_max_rel"] = noise[0], noise[1]
        report["criterion"] = (f"max abs logit error <= {NOISE_FACTOR:g} x the hooked model's own error at "
                               f"{report['dtype']} ({noise[0]:.3g})")
        report["passed"] = max_abs <= NOISE_FACTOR * noise[0]
    if report["nonfinite"]:  # never a pass, whatever the yardstick said
        report["passed"] = False
        report["criterion"] = f"the baked model gives NaN or Inf logits on {report['nonfinite']} prompt(s)"
    return report


def run_candidate_hooked(model, tok, specs, ref, n, logits_only: bool = False) -> list[dict]:
    # the fingerprint was checked at float32 above; the cast model's bytes differ by design
    with steered(model, specs, check_model=False):
        if logits_only:
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            return [{"logits": lg} for chunk in tqdm(_batches(ref), desc="hooked, float64", leave=False)
                    for lg in logits_batch(model, [r["seq"] for r in chunk], pad)]
        return run_candidate(model, tok, ref, n, desc="hooked, other precision")
