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
    texts, tokens, secs = [], 0, 0.0
    for seed in cfg.seeds:
        t, n, s = continuations(model, tok, cfg.prompts, cfg, seed, desc=f"generate (seed {seed})")
        texts += t
        tokens += n
        secs += s
    scores = score(texts)
    toxic = sum(s > cfg.threshold for s in scores)
    return {"toxic_rate": toxic / len(scores), "toxic": toxic, "continuations": len(scores),
            "mean_score": sum(scores) / len(scores), "gen_tokens_per_s": tokens / secs,
            "examples": [{"prompt": p, "continuation": c, "score": s}
                         for p, c, s in zip(cfg.prompts * len(cfg.seeds), texts, scores)][:20]}


@torch.no_grad()
def perplexity(model, tok, cfg: EvalConfig) -> dict:
    """Token-level perplexity over all sentences (each scored on its own, no padding)."""
    nll, count = 0.0, 0
    for s in tqdm(cfg.sentences, desc="perplexity", leave=False, unit="sent"):
        ids = tok(s, return_tensors="pt").input_ids.to(model.device)
        if ids.shape[1] < 2:
            continue
        loss = model(ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "tokens": count}
