"""Which bias slots llama.cpp's loader has, per architecture, asked of llama.cpp itself: for each model type
below, its tiny random model (bake.families.tiny, SmolLM2's tokenizer) is saved, and every Linear of its
decoder layers that has no bias gets one, one kind at a time, in a header-only GGUF written by
llama.cpp's own converter and loaded by llama.cpp (`gguf_convert.refused`). Writes
bake/data/gguf_slots.json, which `bake families` prints; tests/test_gguf_convert.py re-probes two types
against it.

    python benchmarks/gguf_slots.py            # about a minute on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "granite", "olmo2",
         "gpt2", "starcoder2", "stablelm", "cohere", "internlm2", "exaone", "smollm3")
OUT = ROOT / "bake" / "data" / "gguf_slots.json"
NO_EXPERTS = dict(num_local_experts=None, num_experts=None, n_routed_experts=None, num_experts_per_tok=None)
CHANGES = {"qwen3_moe": dict(norm_topk_prob=True, moe_intermediate_size=16), "gemma3_text": dict(query_pre_attn_scalar=8)}


def linear_kinds(model: torch.nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Per kind of Linear without a bias in the decoder layers (its path inside a layer): (name, out)."""
    from bake.families import adapter_for

    kinds: dict[str, list] = {}
    for layer in adapter_for(model).layer_paths(model):
        for name, m in model.get_submodule(layer).named_modules():
            if isinstance(m, torch.nn.Linear) and m.bias is None:
                kinds.setdefault(name, []).append((f"{layer}.{name}", m.out_features))
    return kinds


def probe(model_type: str, tok) -> dict:
    from bake.errors import BakeError
    from bake.exporters import gguf_convert
    from bake.families import adapter_for
    from bake.families.tiny import build

    try:
        model = build(model_type, vocab_size=len(tok), **CHANGES.get(model_type, NO_EXPERTS))
    except Exception as e:  # noqa: BLE001 - recorded, not raised: a type that does not build small
        return {"gguf": False, "why": f"no tiny model: {type(e).__name__}"}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        doc = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        doc["tokenizer_class"] = "GPT2Tokenizer" if model_type == "phi3" else "PreTrainedTokenizerFast"
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(doc))
        def why(e: BakeError) -> str:
            return str(e).split(": ", 1)[-1].replace(tmp, "<dir>")

        note = None
        try:
            gguf_convert.check(Path(tmp))
        except BakeError as e:  # the tokenizer (SmolLM2's here): the slots are probed all the same
            note = why(e)
        try:
            cls, hp = gguf_convert.model_class(Path(tmp))
            arch = gguf_convert.arch_name(cls)
            kinds = linear_kinds(model)
            added = {f"{n}.bias": (o,) for items in kinds.values() for n, o in items}
            bad = {n.rsplit(".", 1)[0] for n in gguf_convert.refused(Path(tmp), hp, added)}
        except (BakeError, FileNotFoundError) as e:
            return {"gguf": False, "why": note or why(e)}
    refused = sorted(k for k, items in kinds.items() if any(n in bad for n, _ in items))
    writer = adapter_for(model).residual_writer
    row = {"gguf": True, "arch": arch, "bias_slots": sorted(set(kinds) - set(refused)), "no_slot": refused,
           "layer_output_writer": writer}
    return {**row, "tokenizer": note} if note else row


def main() -> None:
    from transformers import AutoTokenizer
    from tqdm import tqdm

    from bake.models import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("llama")))
    rows = {t: probe(t, tok) for t in tqdm(TYPES, desc="probing llama.cpp")}
    import llama_cpp

    OUT.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "types": rows}, indent=1) + "\n")
    for t, r in rows.items():
        print(f"{t:12s} {r.get('arch', '-'):10s} slots: {', '.join(r.get('bias_slots', [])) or '-'}; "
              f"none: {', '.join(r.get('no_slot', [])) or '-'} {r.get('why', '')}")


if __name__ == "__main__":
    main()
