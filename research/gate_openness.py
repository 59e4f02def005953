"""How far a DSAS spec's gates open, per token, with its steering on (the hooked reference).

    python research/gate_openness.py SPEC LAMBDA OUT.json

Reports, per text set, the mean gate opening g(x) = σ(w·x + c) over non-padding tokens, averaged
over the gated sites (and the least / most open site), and the share of tokens with g > 0.5. The
sets: the held-out 500 FLORES sentences, and the first 200 self-labelled toxic and benign texts
(the DSAS detectors were fitted on some of these, so their contrast is in-sample).
A gate sees its site's activation before its own map, with every earlier site's steering applied.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the shipped specs and data
sys.path.insert(0, str(HERE.parent))
from bake.evaluation import flores  # noqa: E402
from bake.models import load  # noqa: E402
from bake.runtime import steered  # noqa: E402
from bake.spec import read  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("lam", type=float)
    ap.add_argument("out")
    a = ap.parse_args()
    loaded = load("llama")
    model, tok = loaded.model, loaded.tokenizer
    spec = read(a.spec).with_strength(a.lam)
    mods = dict(model.named_modules())
    acc: dict[str, list[float]] = {}
    mask: dict[str, torch.Tensor] = {}
    hooks = []
    for site, maps in spec.sites:
        name, where = site.rsplit(":", 1)
        if where != "output" or len(maps) != 1 or maps[0].kind != "gated":
            raise SystemExit(f"{site}: this script reads one gated map at a module's output")

        def hook(_m, _inp, out, site=site, gated=maps[0]):  # registered before steering's hook: sees x, not T(x)
            g, m = gated.gate(out), mask["m"]
            s = acc.setdefault(site, [0.0, 0.0, 0.0])
            s[0] += float((g * m).sum())
            s[1] += float(m.sum())
            s[2] += float(((g > 0.5).float() * m).sum())
        hooks.append(mods[name].register_forward_hook(hook))

    def run(texts: list[str]) -> dict:
        acc.clear()
        with steered(model, [spec]), torch.no_grad():
            for i in range(0, len(texts), 32):
                enc = tok(texts[i:i + 32], return_tensors="pt", padding=True)
                mask["m"] = enc.attention_mask.float()
                model(**enc)
        g = [s[0] / s[1] for s in acc.values()]
        return {"texts": len(texts), "tokens": int(next(iter(acc.values()))[1]), "mean_gate": sum(g) / len(g),
                "least_open_site": min(g), "most_open_site": max(g),
                "share_tokens_open": sum(s[2] / s[1] for s in acc.values()) / len(acc)}

    data = EXAMPLES / "data"
    doc = {"spec": a.spec, "lam": a.lam, "sites": len(spec.sites),
           "flores_heldout": run(flores(500, "heldout")),
           "selflabel_toxic_200": run((data / "selflabel_toxic.txt").read_text().splitlines()[:200]),
           "selflabel_benign_200": run((data / "selflabel_benign.txt").read_text().splitlines()[:200])}
    for h in hooks:
        h.remove()
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
