"""The two measurements: toxicity of sampled continuations, and perplexity on fixed sentences."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from . import EvalConfig


@torch.no_grad()
def continuations(model, tok, prompts: list[str], cfg: EvalConfig, seed: int,
                  desc: str = "generate") -> tuple[list[str], int, float]:
    """Sampled continuations (left-padded batches, seeded per batch); also tokens made and seconds."""
    old = tok.padding_side
    tok.padding_side = "left"
    texts, n_tokens, t0 = [], 0, time.perf_counter()
    try:
        for i in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False, unit="batch"):
            torch.manual_seed(seed * 100_003 + i)
            enc = tok(prompts[i:i + cfg.batch_size], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                 temperature=cfg.temperature, top_p=cfg.top_p, top_k=None,
                                 repetition_penalty=cfg.repetition_penalty, pad_token_id=tok.pad_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            n_tokens += int(new.numel())
            texts += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = old
    return texts, n_tokens, time.perf_counter() - t0


def toxicity(model, tok, cfg: EvalConfig, score) -> dict:
    """Toxic rate (score > threshold) and mean score of sampled continuations, pooled over seeds.
    `score` is one scorer or a dict name → scorer; the first one gives the headline numbers and
    every one is reported under `by_scorer`."""
    scorers = score if isinstance(score, dict) else {cfg.scorer: score}
    texts, tokens, secs = [], 0, 0.0
    for seed in cfg.seeds:
        t, n, s = continuations(model, tok, cfg.prompts, cfg, seed, desc=f"generate (seed {seed})")
        texts += t
        tokens += n
        secs += s
    by = {}
    for name, fn in scorers.items():
        sc = fn(texts)
        toxic = sum(x > cfg.threshold for x in sc)
        by[name] = {"toxic_rate": toxic / len(sc), "toxic": toxic, "mean_score": sum(sc) / len(sc), "scores": sc}
    head = by[next(iter(by))]
    return {"toxic_rate": head["toxic_rate"], "toxic": head["toxic"], "continuations": len(texts),
            "mean_score": head["mean_score"], "gen_tokens_per_s": tokens / secs,
            "by_scorer": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in by.items()},
            "examples": [{"prompt": p, "continuation": c, **{k: v["scores"][i] for k, v in by.items()}}
                         for i, (p, c) in enumerate(zip(cfg.prompts * len(cfg.seeds), texts))][:20]}


@torch.no_grad()
def perplexity(model, tok, cfg: EvalConfig) -> dict:
    """Token-level perplexity over all sentences: each sentence scored on its own (right-padded
    batches, padding masked out of attention and loss)."""
    old = tok.padding_side
    tok.padding_side = "right"
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(cfg.sentences), cfg.batch_size), desc="perplexity", leave=False, unit="batch"):
            enc = tok(cfg.sentences[i:i + cfg.batch_size], return_tensors="pt", padding=True).to(model.device)
            logits = model(**enc).logits
            keep = enc.attention_mask[:, 1:].bool()
            # only the kept positions go through the softmax (large vocabularies × padding add up)
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(),
                                                           enc.input_ids[:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    finally:
        tok.padding_side = old
    return {"perplexity": math.exp(nll / count), "tokens": count}
