"""bake diff: how far a steered model (safetensors or ONNX) has moved from the original, as a CI gate.

Per prompt, teacher-forced over every position: the next-token KL divergence KL(original ‖ steered)
and whether both models' top-1 tokens agree; then greedy continuations of both, side by side.
The gate fails (exit 1) when the mean KL over all positions exceeds `max_kl` or the top-1
agreement falls below `min_top1`, and always when either model gives a NaN or Inf logit.
`run(DiffOptions)` is the whole of `bake diff`: validate, run the steered model and then the original
(`bake/artifacts.py` opens them; one is resident at a time, each on `--device` or spread by
`--device-map`), compare, gate, write the reports.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import Artifact
from .errors import BakeError
from .modality import CAUSAL_LM, of_loaded
from .verify import batches, greedy, greedy_batch, logits, logits_batch

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
    device: str = "cpu"  # where each model runs (cpu | cuda | auto), one at a time
    device_map: str | None = None  # or spread by accelerate (auto)


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
    from .models.loading import check_placement

    check_thresholds(o.max_kl, o.min_top1)
    check_placement(o.device, o.device_map)
    if o.max_new_tokens < 1:
        raise BakeError("--max-new-tokens: must be at least 1")
    for field, path in (("--report", o.report), ("--json", o.json)):
        if path and Path(path).is_dir():
            raise BakeError(f"{field}: {path!r} is a directory")


def open_steered(o: DiffOptions) -> Artifact:
    """The steered model, where `o` places it."""
    return CAUSAL_LM.open(o.steered, o.fmt, provider=o.provider, trust_code=o.trust_code, hint=ONNX_HINT,
                          device=o.device, device_map=o.device_map)


def load_original(o: DiffOptions, steered_config):
    """The original `Loaded`, which must be a causal LM of the steered model's kind."""
    from .models import load

    original = load(o.model, device=o.device, device_map=o.device_map)
    of_loaded(original).require_causal(o.model, "bake diff compares causal LMs (for a pipeline, `bake verify` "
                                                "compares latents and pixels)")
    check_same_model(original.model.config, steered_config)
    return original


def check_same_model(original_config, steered_config) -> None:
    """The steered model must be the original's kind (same model type and vocabulary)."""
    for key in CONFIG_KEYS:
        x, y = getattr(original_config, key, None), getattr(steered_config, key, None)
        if key == "model_type":  # a checkpoint with inserted modules: bake_<type>, read as its stock type
            y = getattr(steered_config, "bake_stock_type", None) or y
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
    t0 = time.perf_counter()
    steered = open_steered(o)  # first: a bad steered directory fails before the original loads
    meta = {"original": o.model, "steered": o.steered, "format": steered.format, "runtime": steered.runtime,
            "max_kl": o.max_kl, "min_top1": o.min_top1}
    config = steered.model.config
    b = run_model(steered.model, steered.tokenizer, prompts, o.max_new_tokens, "steered")
    del steered
    gc.collect()
    original = load_original(o, config)
    a = run_model(original.model, original.tokenizer, prompts, o.max_new_tokens, "original")
    tok = original.tokenizer
    del original
    gc.collect()
    result = compare_runs(a, b, tok, prompts, o.max_new_tokens, time.perf_counter() - t0)
    failed = gate(result, o.max_kl, o.min_top1)
    doc = {**meta, "passed": not failed, "failed": failed, **result}
    if o.json:
        write_json_atomic(Path(o.json), doc)
    if o.report:
        diff_report.write(Path(o.report), result, meta, failed)
    return doc


def run_model(model, tok, prompts: list[str], max_new_tokens: int, desc: str) -> list[dict]:
    """One model over every prompt: next-token log-probabilities at each prompt position (float32 on the
    CPU) and the greedy continuation's ids. A PyTorch model runs the prompts in verify's left-padded
    batches; an ONNX or llama.cpp model one at a time."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [tok(p, return_tensors="pt").input_ids[0] for p in prompts]
    if isinstance(model, torch.nn.Module):
        out = []
        for chunk in tqdm(batches(list(zip(prompts, enc))), desc=f"diff ({desc})", leave=False):
            lgs = logits_batch(model, [e for _, e in chunk], pad)
            seqs = greedy_batch(model, tok, [p for p, _ in chunk], max_new_tokens)
            out += [_side(lg, s, len(e)) for lg, s, (_, e) in zip(lgs, seqs, chunk)]
        return out
    return [_side(logits(model, e), greedy(model, tok, p, max_new_tokens), len(e))
            for p, e in tqdm(list(zip(prompts, enc)), desc=f"diff ({desc})", leave=False)]


def _side(logits: torch.Tensor, seq: torch.Tensor, n_prompt: int) -> dict:
    """What compare keeps of one model on one prompt: its log-probabilities (float32), whether they are
    finite, and the continuation."""
    return {"logp": torch.log_softmax(logits, -1).float(), "finite": bool(torch.isfinite(logits).all()),
            "continuation": seq[n_prompt:]}


def compare(original, steered, tok, prompts: list[str], max_new_tokens: int = 32) -> dict:
    """Per prompt: next-token KL and top-1 agreement at every position, then both greedy continuations;
    `summary` pools the positions of all prompts (both models resident; `run` holds one at a time)."""
    t0 = time.perf_counter()
    a = run_model(original, tok, prompts, max_new_tokens, "original")
    b = run_model(steered, tok, prompts, max_new_tokens, "steered")
    return compare_runs(a, b, tok, prompts, max_new_tokens, time.perf_counter() - t0)


def compare_runs(runs_a: list[dict], runs_b: list[dict], tok, prompts: list[str], max_new_tokens: int,
                 seconds: float) -> dict:
    """The rows and summary from the original's runs (`a`) and the steered model's (`b`):
    KL(a ‖ b) = Σ p_a (log p_a − log p_b) per position, top-1 agreement, first divergence of greedy."""
    rows = []
    for p, ra, rb in zip(prompts, runs_a, runs_b):
        lpa, lpb = ra["logp"].double(), rb["logp"].double()
        kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp(min=0)  # per position
        top1 = (lpa.argmax(-1) == lpb.argmax(-1)).double()
        ga, gb = ra["continuation"].tolist(), rb["continuation"].tolist()
        first = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), None)
        rows.append({"prompt": p, "positions": len(lpa), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                     "top1_agreement": top1.mean().item(), "kl_sum": kl.sum().item(), "top1_sum": top1.sum().item(),
                     "original": tok.decode(ga, skip_special_tokens=True),
                     "steered": tok.decode(gb, skip_special_tokens=True),
                     "greedy_same": first is None, "first_divergence": first,
                     "finite": ra["finite"] and rb["finite"]})
    n = sum(r["positions"] for r in rows)
    summary = {"prompts": len(rows), "positions": n, "kl_mean": sum(r["kl_sum"] for r in rows) / n,
               "kl_max": max(r["kl_max"] for r in rows), "kl_prompt_max": max(r["kl_mean"] for r in rows),
               "top1_agreement": sum(r["top1_sum"] for r in rows) / n,
               "greedy_same": sum(r["greedy_same"] for r in rows), "max_new_tokens": max_new_tokens,
               "nonfinite_prompts": sum(not r["finite"] for r in rows), "seconds": round(seconds, 1)}
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
