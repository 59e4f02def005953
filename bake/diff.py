"""bake diff: how far a steered model (safetensors or ONNX) has moved from the original, as a CI gate.

Per prompt, teacher-forced over every position: the next-token KL divergence KL(original ‖ steered)
and whether both models' top-1 tokens agree; then greedy continuations of both, side by side.
The gate fails (exit 1) when the mean KL over all positions exceeds `max_kl` or the top-1
agreement falls below `min_top1`, and always when either model gives a NaN or Inf logit.
`run(DiffOptions)` is the whole of `bake diff`: validate, open both models (`bake/artifacts.py`),
compare, gate, write the reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import Artifact
from .errors import BakeError
from .modality import CAUSAL_LM, of_loaded
from .verify import greedy

DEFAULT_FLORES = 24  # held-out FLORES sentences added to the probes by default
ONNX_HINT = " (or use its ONNX export: --format onnx)"  # how to diff a checkpoint with generated code unrun
CONFIG_KEYS = ("model_type", "vocab_size")  # what must agree for the two models to be the same model


@dataclass(frozen=True)
class DiffOptions:
    """One `bake diff`: the two models, which format of `steered`, prompts (a file; None: the default
    probes), the gate's thresholds and where the reports go."""

    model: str
    steered: str
    fmt: str = "auto"
    provider: str = "auto"
    prompts: str | None = None
    trust_code: bool = False
    max_kl: float | None = None
    min_top1: float | None = None
    max_new_tokens: int = 32
    report: str | None = None
    json: str | None = None


def default_prompts() -> list[str]:
    """The causal LMs' probe prompts plus held-out FLORES sentences."""
    from .evaluation import flores

    return CAUSAL_LM.probes() + flores(DEFAULT_FLORES, "heldout")


def check_thresholds(max_kl: float | None, min_top1: float | None) -> None:
    """The gate's thresholds: a finite KL ≥ 0, a top-1 agreement in [0, 1]."""
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl >= 0):
        raise BakeError(f"--max-kl: must be a finite number ≥ 0, got {max_kl}")
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 <= min_top1 <= 1):
        raise BakeError(f"--min-top1: must be between 0 and 1, got {min_top1}")


def check_options(o: DiffOptions) -> None:
    """Bad options fail before any model is loaded."""
    check_thresholds(o.max_kl, o.min_top1)
    if o.max_new_tokens < 1:
        raise BakeError("--max-new-tokens: must be at least 1")
    for field, path in (("--report", o.report), ("--json", o.json)):
        if path and Path(path).is_dir():
            raise BakeError(f"{field}: {path!r} is a directory")


def open_pair(o: DiffOptions):
    """(original `Loaded`, steered `Artifact`): the steered directory first, then the original, which must
    be a causal LM of the same kind."""
    from .models import load

    steered = CAUSAL_LM.open(o.steered, o.fmt, provider=o.provider, trust_code=o.trust_code, hint=ONNX_HINT)
    original = load(o.model)
    of_loaded(original).require_causal(o.model, "bake diff compares causal LMs (for a pipeline, `bake verify` "
                                                "compares latents and pixels)")
    check_same_model(original.model, steered)
    return original, steered


def check_same_model(original, steered: Artifact) -> None:
    """The steered model must be the original's kind (same model type and vocabulary)."""
    for key in CONFIG_KEYS:
        x, y = getattr(original.config, key, None), getattr(steered.model.config, key, None)
        if x != y:
            raise BakeError(f"--steered: {key} {y!r} differs from the original model's {x!r} (another model?)")


def run(o: DiffOptions) -> dict:
    """`bake diff`: the JSON document (options, `passed`, `failed` lines, `summary`, `rows`), also written
    to `o.json` and as an HTML page to `o.report` when given."""
    from . import diff_report
    from .evaluation import write_json_atomic
    from .verify import read_prompts

    check_options(o)
    prompts = read_prompts(o.prompts) if o.prompts else default_prompts()
    original, steered = open_pair(o)
    result = compare(original.model, steered.model, original.tokenizer, prompts, o.max_new_tokens)
    failed = gate(result, o.max_kl, o.min_top1)
    meta = {"original": o.model, "steered": o.steered, "format": steered.format, "runtime": steered.runtime,
            "max_kl": o.max_kl, "min_top1": o.min_top1}
    doc = {**meta, "passed": not failed, "failed": failed, **result}
    if o.json:
        write_json_atomic(Path(o.json), doc)
    if o.report:
        diff_report.write(Path(o.report), result, meta, failed)
    return doc


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of one unpadded sequence, float64 on the CPU."""
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    return out.logits[0].double().cpu()


def compare(original, steered, tok, prompts: list[str], max_new_tokens: int = 32) -> dict:
    """Per prompt: next-token KL and top-1 agreement at every position, then both greedy continuations;
    `summary` pools the positions of all prompts."""
    rows = []
    t0 = time.perf_counter()
    for p in tqdm(prompts, desc="diff", unit="prompt"):
        ids = tok(p, return_tensors="pt").input_ids[0]
        a, b = _logits(original, ids), _logits(steered, ids)
        lpa, lpb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp(min=0)  # per position
        top1 = (a.argmax(-1) == b.argmax(-1)).double()
        finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
        ga = greedy(original, tok, p, max_new_tokens)[len(ids):]
        gb = greedy(steered, tok, p, max_new_tokens)[len(ids):]
        first = next((i for i, (x, y) in enumerate(zip(ga.tolist(), gb.tolist())) if x != y), None)
        rows.append({"prompt": p, "positions": len(ids), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                     "top1_agreement": top1.mean().item(), "kl_sum": kl.sum().item(), "top1_sum": top1.sum().item(),
                     "original": tok.decode(ga, skip_special_tokens=True),
                     "steered": tok.decode(gb, skip_special_tokens=True),
                     "greedy_same": first is None, "first_divergence": first, "finite": finite})
    n = sum(r["positions"] for r in rows)
    summary = {"prompts": len(rows), "positions": n, "kl_mean": sum(r["kl_sum"] for r in rows) / n,
               "kl_max": max(r["kl_max"] for r in rows), "kl_prompt_max": max(r["kl_mean"] for r in rows),
               "top1_agreement": sum(r["top1_sum"] for r in rows) / n,
               "greedy_same": sum(r["greedy_same"] for r in rows), "max_new_tokens": max_new_tokens,
               "nonfinite_prompts": sum(not r["finite"] for r in rows),
               "seconds": round(time.perf_counter() - t0, 1)}
    for r in rows:
        del r["kl_sum"], r["top1_sum"]
    return {"summary": summary, "rows": rows}


def gate(result: dict, max_kl: float | None, min_top1: float | None) -> list[str]:
    """The thresholds crossed, as readable lines (empty: the gate passes)."""
    s, failed = result["summary"], []
    bad = s.get("nonfinite_prompts", 0)
    if bad or not all(math.isfinite(s[k]) for k in ("kl_mean", "kl_max", "top1_agreement")):
        # a NaN compares False with every threshold: it must fail on its own, with or without thresholds
        failed.append(f"non-finite logits or KL: {bad}/{s['prompts']} prompt(s) give NaN or Inf logits (mean KL "
                      f"{s['kl_mean']:.4g}); the steered model is broken")
    if max_kl is not None and s["kl_mean"] > max_kl:
        failed.append(f"mean next-token KL {s['kl_mean']:.4g} > --max-kl {max_kl:g}")
    if min_top1 is not None and s["top1_agreement"] < min_top1:
        failed.append(f"top-1 agreement {s['top1_agreement']:.4f} < --min-top1 {min_top1:g}")
    return failed
