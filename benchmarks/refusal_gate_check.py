"""How far each refusal gate opens, and why gated and ungated vectors refuse harmful requests alike when
sampled. On the held-out harmful, benign and harmless prompts (chat-formatted, the original model):
the σ gate of examples/refuse_sigmoid.json, σ(w·h + c) with h the residual after layer 12, and the
units gate of examples/refuse.json, f(w·z + c)·(u·z) with z layer 12's MLP input (bake/fit/dsas_units.py),
at the last prompt token and averaged over every prompt token; then how many seed-0 sampled answers of
each gated model are identical to the ungated vector's, per set. Prints; the answers go to --out.

    python benchmarks/refusal_gate_check.py [--n-prompts 30] [--out gate_check.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("refuse_caa.json", "refuse_sigmoid.json", "refuse.json")


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
    harmful, benign, harmless = refusal_sets("heldout", a.n_prompts)
    sets = {"harmful": chat_texts(tok, harmful), "benign": chat_texts(tok, benign), "harmless": chat_texts(tok, harmless)}
    for kind, texts in sets.items():
        g = gates(model, tok, texts, read(ROOT / "examples" / "refuse_sigmoid.json"), read(ROOT / "examples" / "refuse.json"))
        print(f"{kind}: " + "; ".join(f"{name} gate at the last prompt token mean {sum(v['last']) / len(v['last']):.3f} "
                                      f"(min {min(v['last']):.3g}, max {max(v['last']):.3g}), over every prompt token "
                                      f"{sum(v['all']) / len(v['all']):.3f}" for name, v in g.items()), flush=True)
    said = {}
    for name in SPECS:
        with steered(model, [read(ROOT / "examples" / name)]):
            said[name] = {k: responses(model, tok, t, 32, 16, seed=0) for k, t in sets.items() if k != "harmless"}
    for name in SPECS[1:]:
        same = {k: sum(x == y for x, y in zip(said[SPECS[0]][k], said[name][k])) for k in said[name]}
        print(f"identical sampled answers (seed 0), {name} vs the ungated vector: "
              + ", ".join(f"{k} {n}/{len(sets[k])}" for k, n in same.items()))
    Path(a.out).write_text(json.dumps(said, indent=1) + "\n")


@torch.no_grad()
def gates(model, tok, texts: list[str], sigmoid_spec, units_spec) -> dict:
    """Per text, each gate's value at the last prompt token and its mean over the prompt's tokens."""
    from bake.fit.dsas_units import unit_gate

    gate = sigmoid_spec.sites[0][1][0]
    w, c = gate.tensors["w"].double(), gate.tensors["c"].double()
    (site, (units,)), = units_spec.sites
    box = {}
    mlp = model.get_submodule(site.split(":")[0].rsplit(".", 1)[0])
    handle = mlp.gate_proj.register_forward_pre_hook(lambda m, args: box.update(z=args[0]))
    out = {"sigmoid": {"last": [], "all": []}, "units": {"last": [], "all": []}}
    try:
        for t in texts:
            h = model(**tok(t, return_tensors="pt", add_special_tokens=False), output_hidden_states=True).hidden_states[13][0]
            for name, g in (("sigmoid", torch.sigmoid(h.double() @ w + c)),
                            ("units", unit_gate(units, box["z"][0], units_spec.params["sharpness"]))):
                out[name]["last"].append(float(g[-1]))
                out[name]["all"].append(float(g.mean()))
    finally:
        handle.remove()
    return out


if __name__ == "__main__":
    main()
