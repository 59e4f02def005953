"""bake diff: how far a steered model (safetensors or ONNX) has moved from the original, as a CI gate.

Per prompt, teacher-forced over every position: the next-token KL divergence KL(original ‖ steered)
and whether both models' top-1 tokens agree; then greedy continuations of both, side by side.
The gate fails (exit 1) when the mean KL over all positions exceeds `max_kl` or the top-1
agreement falls below `min_top1`, and always when either model gives a NaN or Inf logit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import BakeError
from .verify import PROBES, greedy

DEFAULT_FLORES = 24  # held-out FLORES sentences added to the probes by default


def default_prompts() -> list[str]:
    from .eval import flores

    return PROBES + flores(DEFAULT_FLORES, "heldout")


def check_thresholds(max_kl: float | None, min_top1: float | None) -> None:
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl >= 0):
        raise BakeError(f"--max-kl: must be a finite number ≥ 0, got {max_kl}")
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 <= min_top1 <= 1):
        raise BakeError(f"--min-top1: must be between 0 and 1, got {min_top1}")


def load_steered(path: str | Path, fmt: str = "auto", provider: str = "auto", trust_code: bool = False):
    """(model, tokenizer, format) for a steered directory: safetensors (stock from_pretrained) or ONNX."""
    from .ort import is_onnx_dir, load_onnx

    p = Path(path)
    if not p.is_dir():
        raise BakeError(f"--steered: {str(path)!r} is not a directory")
    has_st = (p / "config.json").is_file() and any(p.glob("*.safetensors"))
    has_onnx = is_onnx_dir(p)
    if fmt == "auto":
        fmt = "safetensors" if has_st else "onnx" if has_onnx else ""
    if fmt not in ("safetensors", "onnx"):
        raise BakeError(f"--steered: {str(path)!r} is not a model directory (no safetensors weights with "
                        f"config.json, no model.onnx)" if not fmt else f"--format: unknown format {fmt!r}")
    if fmt == "onnx":
        if not has_onnx:
            raise BakeError(f"--steered: {str(path)!r} holds no model.onnx")
        model, tok = load_onnx(p, provider)
        return model, tok, "onnx"
    if not has_st:
        raise BakeError(f"--steered: {str(path)!r} holds no safetensors checkpoint")
    from .models import load
    from .modules import CODE, needs_code

    if needs_code(p) and not trust_code:
        # a stock loader would silently drop the inserted modules: refuse instead
        raise BakeError(f"--steered: {str(path)!r} carries generated code ({CODE}, for inserted modules); read it, "
                        f"then pass --trust-remote-code (or use its ONNX export: --format onnx)")
    loaded = load(str(p), trust_remote_code=trust_code and needs_code(p))
    return loaded.model, loaded.tokenizer, "safetensors"


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    return out.logits[0].double().cpu()


def compare(original, steered, tok, prompts: list[str], max_new_tokens: int = 32) -> dict:
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
