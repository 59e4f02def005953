"""fit for text-to-image pipelines: per-site activations from a one-step call of the pipeline.

Denoiser sites are pooled over height and width (or over image tokens) to one sample per prompt and
channel, from the conditional half of a classifier-free-guidance batch. Text-encoder sites are pooled
over tokens, from the encoder's first call of each pipeline run (the prompt; the negative prompt
comes after it). Maps fitted this way apply at every pixel and every denoising step.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import BakeError
from ..families.table import SiteInfo
from ..models.diffusion import DENOISERS, PipelineModel, run_pipeline


def _pooled(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    x = x.movedim(unit_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).float().mean(1)


def collect_pipeline(root: PipelineModel, prompts: list[str], infos: list[SiteInfo], steps: int = 1, seed: int = 0,
                     batch_size: int = 4, desc: str = "activations", progress: bool = True) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {s.name: [] for s in infos}
    state = {"n": 0, "seen": set()}

    def watch(info: SiteInfo):
        comp = info.module.split(".", 1)[0]

        def keep(x: torch.Tensor):
            p = _pooled(x.detach(), info.unit_dim)
            if comp in DENOISERS:
                if p.shape[0] == 2 * state["n"]:
                    p = p[state["n"]:]  # classifier-free guidance: [unconditional, conditional]
            elif (comp, info.name) in state["seen"]:
                return  # a text encoder's later calls encode the negative prompt
            else:
                state["seen"].add((comp, info.name))
            got[info.name].append(p.cpu())

        def out_hook(module, args, output):
            keep(output[0] if isinstance(output, tuple) else output)

        def in_hook(module, args, kwargs):
            keep(args[0] if args else next(iter(kwargs.values())))

        mod = root.get_submodule(info.module)
        if info.side == "output":
            return mod.register_forward_hook(out_hook)
        return mod.register_forward_pre_hook(in_hook, with_kwargs=True)

    handles = [watch(s) for s in infos]
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            batch = prompts[i:i + batch_size]
            state["n"], state["seen"] = len(batch), set()
            run_pipeline(root, batch, steps, seed + i, "latent")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for s in infos:
        if not got[s.name]:
            raise BakeError(f"fit: site {s.name} was never run by the pipeline (is it on a component the pipeline "
                            f"does not call?)")
        out[s.name] = torch.cat(got[s.name])
    return out
