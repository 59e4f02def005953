"""Self-labelled fitting data for the detox recipe: the embedded model's own continuations of the
*tuning* RealToxicityPrompts prefixes (never the held-out ones), split by the scorer.

    python research/self_label.py [--model llama] [--seeds 0,1,2,3] [--device cuda --batch-size 160]

The shipped files came from `--seeds 0,…,15 --device cuda --batch-size 160` on an H100 (2528
continuations → 243 toxic, 1676 benign); sampling on a GPU draws other numbers than on a CPU,
so a CPU run gives different (equally valid) sets.

Writes examples/data/selflabel_toxic.txt (continuations scored > 0.5) and
examples/data/selflabel_benign.txt (scored < 0.1), one continuation a line; the scorer sees the
continuation only, as in `bake eval`. Sampling settings are those of
`bake eval` (T = 1, top-p 0.3, repetition penalty 1.2, 32 tokens), with seeds offset by 1000 so that
they never coincide with evaluation seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bake.evaluation import EvalConfig, rtp_prompts
from bake.evaluation.scorers import load_scorer
from bake.evaluation.tasks import continuations
from bake.models import load

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--benign-below", type=float, default=0.1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--out-dir", default=str(EXAMPLES / "data"), help="where the two files go")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (part of the seed)")
    a = ap.parse_args()
    prompts = rtp_prompts("tune")
    cfg = EvalConfig(tasks=["toxicity"], prompts=prompts, sentences=[], batch_size=a.batch_size)
    loaded = load(a.model, device=a.device)
    score = load_scorer("profanity")
    texts = []
    for seed in (int(s) for s in a.seeds.split(",")):
        conts, _, _ = continuations(loaded.model, loaded.tokenizer, prompts, cfg, 1000 + seed)
        texts += [" ".join(c.split()) for c in conts]
    texts = [t for t in texts if t]
    scores = score(texts)
    toxic = [t for t, s in zip(texts, scores) if s > 0.5]
    benign = [t for t, s in zip(texts, scores) if s < a.benign_below]
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selflabel_toxic.txt").write_text("\n".join(toxic) + "\n", encoding="utf-8")
    (out / "selflabel_benign.txt").write_text("\n".join(benign) + "\n", encoding="utf-8")
    print(f"{len(texts)} continuations: {len(toxic)} toxic, {len(benign)} benign (< {a.benign_below})")


if __name__ == "__main__":
    main()
