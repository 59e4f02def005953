"""Why the gated and ungated refusal vectors refuse harmful requests alike when sampled: the gate's
value σ(w·h + c) at the last prompt token of each held-out prompt (h: the residual after layer 12,
where examples/refuse_sigmoid.json gates), and how many seed-0 sampled answers of the two models are
identical, per set. Prints; the answers go to --out.

    python benchmarks/refusal_gate_check.py [--n-prompts 30] [--out gate_check.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--out", default="gate_check.json")
    a = ap.parse_args()
    from bake.evaluation import refusal_sets
    from bake.evaluation.refusal import chat_texts, responses
    from bake.models import load
    from bake.runtime import steered
    from bake.spec import read

    loaded = load(a.model)
    tok, model = loaded.tokenizer, loaded.model
    harmful, benign, _ = refusal_sets("heldout", a.n_prompts)
    sets = {"harmful": chat_texts(tok, harmful), "benign": chat_texts(tok, benign)}
    said = {}
    for name in ("refuse_caa.json", "refuse_sigmoid.json"):
        with steered(model, [read(ROOT / "examples" / name)]):
            said[name] = {k: responses(model, tok, t, 32, 16, seed=0) for k, t in sets.items()}
    gate = read(ROOT / "examples" / "refuse_sigmoid.json").sites[0][1][0]
    w, c = gate.tensors["w"].double(), gate.tensors["c"].double()
    for kind, texts in sets.items():
        same = sum(x == y for x, y in zip(said["refuse_caa.json"][kind], said["refuse_sigmoid.json"][kind]))
        last = []
        for t in texts:
            with torch.no_grad():
                h = model(**tok(t, return_tensors="pt", add_special_tokens=False),
                          output_hidden_states=True).hidden_states[13][0, -1].double()
            last.append(float(torch.sigmoid(h @ w + c)))
        print(f"{kind}: gate at the last prompt token mean {sum(last) / len(last):.3f} (min {min(last):.3g}, "
              f"max {max(last):.3g}); identical sampled answers, gated vs ungated (seed 0): {same}/{len(texts)}")
    Path(a.out).write_text(json.dumps(said, indent=1) + "\n")


if __name__ == "__main__":
    main()
