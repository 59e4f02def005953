"""Files that every runtime reads as the same model, not only the transformers that wrote them.

transformers 5 writes RoPE settings only as `rope_parameters` and names the tokenizer class
`TokenizersBackend`. transformers 4.x (what vLLM, Optimum and most serving stacks pin) then silently
falls back to `rope_theta` 10000 (SmolLM2 needs 100000: greedy 0/5 identical, logits off by 5.5), and
llama.cpp's converter under its pinned transformers cannot find the tokenizer class. So every output
directory gets, next to what transformers 5 wrote:

- config.json: the top-level `rope_theta` (and `rope_scaling` for a non-default RoPE) that 4.x reads;
  for per-layer-type RoPE (Gemma-3: full and sliding attention) the global one as `rope_theta` /
  `rope_scaling` and the sliding one as `rope_local_base_freq`;
  written only where the installed transformers still reads the config as before (Gemma-4's
  "proportional" RoPE or LFM-3's per-layer-type RoPE would read the legacy fields as a different
  RoPE, or fail);
- tokenizer_config.json: the concrete `PreTrainedTokenizerFast` (what `TokenizersBackend` is);
- generation_config.json, built from the config when the writer left none (ONNX-only output);
- no `auto_map` that names the source model's own code (only bake's generated code, where it wrote some).
"""

from __future__ import annotations

import json
from pathlib import Path

GENERIC_TOKENIZERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _rope_fields(rp: dict) -> dict:
    """The transformers-4 spelling of one RoPE block: rope_theta, and rope_scaling unless default."""
    out = {}
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        out["rope_scaling"] = scaling
    return out


def legacy_rope(cfg: dict) -> dict:
    """Top-level fields a transformers-4 reader needs for the RoPE in `cfg["rope_parameters"]` (those
    the config does not already carry)."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return {}
    if all(isinstance(v, dict) for v in rp.values()):  # per layer type (Gemma-3)
        add = _rope_fields(rp.get("full_attention", {}))
        if "rope_theta" in rp.get("sliding_attention", {}):
            add["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    else:
        add = _rope_fields(rp)
    return {k: v for k, v in add.items() if k not in cfg}


def _rewrite_json(path: Path, fn) -> list[str]:
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    changed = fn(doc)
    if changed:
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return changed


def _config(doc: dict) -> list[str]:
    add = legacy_rope(doc)
    doc.update(add)
    return [f"config.json: {k} = {v}" for k, v in add.items()]


def _config_file(path: Path) -> list[str]:
    """config.json with the legacy RoPE fields, kept only if transformers reads the same config."""
    if not path.is_file():
        return []
    before = path.read_text(encoding="utf-8")
    changed = _rewrite_json(path, _config)
    if changed and not _reads_same(path, before):
        path.write_text(before, encoding="utf-8")
        return ["config.json: no legacy RoPE fields (the installed transformers would read them as another RoPE)"]
    return changed


def _reads_same(path: Path, before: str) -> bool:
    """True if transformers loads `path` to the config it loads from the text `before` (rope included)."""
    import tempfile

    from ..modules import stock_config

    added = set(json.loads(path.read_text(encoding="utf-8"))) - set(json.loads(before))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(before, encoding="utf-8")
        old = stock_config(tmp).to_dict()
    try:
        new = stock_config(path.parent).to_dict()
    except Exception:  # noqa: BLE001 - a config the legacy fields break: not the same
        return False
    skip = added | {"_name_or_path"}
    return {k: v for k, v in new.items() if k not in skip} == {k: v for k, v in old.items() if k not in skip}


def _tokenizer_config(doc: dict) -> list[str]:
    cls = doc.get("tokenizer_class")
    if cls in GENERIC_TOKENIZERS:
        doc["tokenizer_class"] = GENERIC_TOKENIZERS[cls]
        return [f"tokenizer_config.json: tokenizer_class {cls} → {doc['tokenizer_class']}"]
    return []


def _generation_config(out: Path) -> list[str]:
    if (out / "generation_config.json").is_file() or not (out / "config.json").is_file():
        return []
    from transformers import GenerationConfig

    from ..modules import stock_config

    cfg = stock_config(out)  # the model's own config class (never its code): its
    GenerationConfig.from_model_config(cfg).save_pretrained(str(out))  # rope defaults need its fields
    return ["generation_config.json (from config.json)"]


def make_portable(out: Path) -> list[str]:
    """Rewrite a finished output directory's config and tokenizer files in place so that older
    runtimes read the same model; returns what it changed, for the report."""
    from ..modules import drop_foreign_code

    out = Path(out)
    return (drop_foreign_code(out) + _config_file(out / "config.json")
            + _rewrite_json(out / "tokenizer_config.json", _tokenizer_config)
            + _generation_config(out))
