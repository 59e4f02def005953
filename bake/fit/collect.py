"""Activation collection: per text, the mean over its non-pad tokens of each site's activation.

Memory is bounded by texts × units per site (never by sequence length × layers), batches show a
progress bar, and a forward pass stops as soon as the last site it needs has been seen.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models import SiteInfo


class _Enough(Exception):
    pass


@torch.no_grad()
def collect(model, tok, texts: list[str], sites: list[SiteInfo], batch_size: int = 16, desc: str = "collect",
            stop_early: bool = True) -> dict[str, torch.Tensor]:
    """{site name: [len(texts), units] float32} of per-text pooled (mean over tokens) activations."""
    pooled: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    mask_box: list[torch.Tensor] = []
    last = sites[-1].name if stop_early else None

    def record(name: str, x: torch.Tensor):
        m = mask_box[0].to(x.dtype)[..., None]  # [B, T, 1]
        pooled[name].append(((x * m).sum(1) / m.sum(1)).float().cpu())
        if name == last:
            raise _Enough

    def out_hook(name):
        def hook(module, args, output):
            record(name, output[0] if isinstance(output, tuple) else output)
        return hook

    def in_hook(name):
        def hook(module, args, kwargs):
            record(name, args[0] if args else next(iter(kwargs.values())))
        return hook

    handles = []
    for s in sites:
        mod = model.get_submodule(s.module)
        if s.side == "output":
            handles.append(mod.register_forward_hook(out_hook(s.name)))
        else:
            handles.append(mod.register_forward_pre_hook(in_hook(s.name), with_kwargs=True))
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, unit="batch"):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
            mask_box[:] = [enc.attention_mask.to(model.device)]
            try:
                model(input_ids=enc.input_ids.to(model.device), attention_mask=enc.attention_mask.to(model.device),
                      use_cache=False)
            except _Enough:
                pass
    finally:
        tok.padding_side = old_side
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in pooled.items()}
