"""A sweep: the original model, then a spec at each strength (hooked) and/or a baked directory.

The JSON is rewritten after every finished point; a rerun with the same settings, model and specs
keeps the finished points and computes only the missing ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..modality import of_loaded
from ..models import load, pick_device
from ..runtime import steered
from ..spec import Spec
from . import EvalConfig, write_json_atomic
from .scorers import PICKLES, load_scorers
from .refusal import chat_texts, first_token_logprobs, refusal
from .tasks import perplexity, toxicity


def measure(model, tok, cfg: EvalConfig, score, base: dict | None = None) -> dict:
    """One point's tasks. `base` holds the original's first-token log-probabilities for the refusal
    task's KL (set by the original point, which runs first)."""
    out = {}
    if "toxicity" in cfg.tasks:
        out["toxicity"] = toxicity(model, tok, cfg, score)
    if "perplexity" in cfg.tasks:
        out["perplexity"] = perplexity(model, tok, cfg)
    if "refusal" in cfg.tasks:
        r = refusal(model, tok, cfg, None if base is None else base.get("logprobs"))
        if base is not None and "logprobs" not in base:
            base["logprobs"] = r["first_token_logprobs"]
        del r["first_token_logprobs"]
        out["refusal"] = r
    return out


def run(model_name: str, cfg: EvalConfig, out: Path, specs: list[Spec] | None = None,
        strengths: list[float] | None = None, baked: str | None = None, plot_path: Path | None = None,
        log=print, device: str = "cpu", trust_code: bool = False) -> dict:
    score = load_scorers(cfg.scorer) if "toxicity" in cfg.tasks else None
    ident = {"model": model_name, "specs": [s.sha256() if s.path else s.method for s in specs or []],
             "baked": str(baked) if baked else None, "config_key": cfg.key(),
             "device": str(pick_device(device))}
    doc = {**ident, "config": {"tasks": cfg.tasks, "prompts": len(cfg.prompts), "sentences": len(cfg.sentences),
                               "seeds": cfg.seeds, "max_new_tokens": cfg.max_new_tokens,
                               "temperature": cfg.temperature, "top_p": cfg.top_p,
                               "repetition_penalty": cfg.repetition_penalty, "scorer": cfg.scorer,
                               "threshold": cfg.threshold,
                               "refusal_prompts": {"harmful": len(cfg.refusal_harmful),
                                                   "benign": len(cfg.refusal_benign),
                                                   "harmless": len(cfg.refusal_harmless)},
                               "system": cfg.system, "refusal_sampled": cfg.refusal_sampled},
           "scorer_loads_pickle": {n: PICKLES[n] for n in score or {} if PICKLES.get(n)}, "points": []}
    for note in doc["scorer_loads_pickle"].values():
        log(f"note: {note}")
    if out.is_file():
        try:
            old = json.loads(out.read_text(encoding="utf-8"))
            if all(old.get(k) == v for k, v in ident.items()):
                doc["points"] = old.get("points", [])
                log(f"resuming {out}: {len(doc['points'])} point(s) already done")
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    done = {p["label"] for p in doc["points"]}
    todo: list[tuple[str, float | None]] = [("original", None)]
    todo += [(f"λ={lam:g}", lam) for lam in (strengths or []) if specs]
    if baked:
        todo.append(("baked", None))
    if baked and "baked" not in done:
        _check_opens(baked, trust_code)
    loaded = None
    base = {} if "refusal" in cfg.tasks else None  # the original's first-token log-probabilities
    for label, lam in tqdm(todo, desc="eval points", unit="point"):
        if label in done:
            continue
        if base is not None and "logprobs" not in base and label != "original":  # resumed after the original
            loaded = loaded or load(model_name, device=device)
            base["logprobs"] = first_token_logprobs(loaded.model, loaded.tokenizer,
                                                    chat_texts(loaded.tokenizer, cfg.refusal_harmless, cfg.system),
                                                    cfg.batch_size)
        if label == "baked":
            from ..artifacts import open_artifact

            art = open_artifact(baked, trust_code=trust_code, flag="--baked")
            bm, btok, fmt = art.model, art.tokenizer, art.format
            if fmt == "safetensors" and str(pick_device(device)) != "cpu":
                bm.to(pick_device(device))
            point = measure(bm, btok, cfg, score, base)
            point["format"] = fmt
            del bm
        else:
            loaded = loaded or load(model_name, device=device)
            of_loaded(loaded).require_causal(model_name, "bake eval measures causal LMs")
            if lam is None:
                point = measure(loaded.model, loaded.tokenizer, cfg, score, base)
            else:
                with steered(loaded.model, [s.with_strength(lam) for s in specs]):
                    point = measure(loaded.model, loaded.tokenizer, cfg, score, base)
        doc["points"].append({"label": label, "strength": lam, **point})
        write_json_atomic(out, doc)
        log(summary_line(doc["points"][-1]))
    order = {label: i for i, (label, _) in enumerate(todo)}
    doc["points"].sort(key=lambda p: order.get(p["label"], len(order)))
    write_json_atomic(out, doc)
    if plot_path is not None:
        from .plot import plot

        plot(doc, plot_path)
    return doc


def _check_opens(baked: str, trust_code: bool) -> None:
    """Open --baked once before any work (and let it go): a directory or GGUF that cannot run is refused
    before the original is evaluated and before --out is written."""
    import gc

    from ..artifacts import open_artifact

    art = open_artifact(baked, trust_code=trust_code, flag="--baked")
    del art
    gc.collect()


def summary_line(p: dict) -> str:
    parts = [f"{p['label']:>10}"]
    if "toxicity" in p:
        t = p["toxicity"]
        parts.append(f"toxic {100 * t['toxic_rate']:.1f}% ({t['toxic']}/{t['continuations']}), "
                     f"mean score {t['mean_score']:.3f}, {t['gen_tokens_per_s']:.0f} tok/s")
    if "perplexity" in p:
        parts.append(f"perplexity {p['perplexity']['perplexity']:.2f}")
    if "refusal" in p:
        r = p["refusal"]
        parts.append(f"refuses {100 * r['harmful']['refusal_rate']:.0f}% of harmful ({r['harmful']['refusals']}/"
                     f"{r['harmful']['prompts']}; by opening {100 * r['harmful']['opening_refusal_rate']:.0f}%), "
                     f"{100 * r['benign']['refusal_rate']:.0f}% of benign, first-token KL {r['harmless_kl']:.4f}")
        if "sampled" in r["harmful"]:
            h, b = r["harmful"]["sampled"], r["benign"]["sampled"]
            parts.append(f"sampled: {100 * h['refusal_rate']:.0f}% of harmful ({h['refusals']}/{h['responses']}), "
                         f"{100 * b['refusal_rate']:.0f}% of benign ({b['refusals']}/{b['responses']})")
    return "  ".join(parts)
