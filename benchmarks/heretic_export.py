"""Run inside heretic's own virtual environment (heretic-llm is AGPL-3.0: bake imports nothing of it;
this script only calls heretic's public classes): re-create given trials of a finished heretic study
and save each abliterated model as a stock checkpoint, so that bake's evaluator can score heretic's
models and bake's on the same held-out prompts.

    <heretic-venv>/bin/python benchmarks/heretic_export.py WORKDIR TRIALS.json

WORKDIR holds the config.toml heretic ran with; TRIALS.json is a list of
{"trial": N, "direction_index": float | null, "parameters": {component: {...}}} (heretic's own user
attributes of each trial); each model goes to WORKDIR/heretic_models/trial_N. The refusal directions
are computed as heretic's main computes them before its study: the per-layer mean residual of the bad
prompts minus the good prompts, normalised, and (heretic's default `orthogonalize_direction`) made
orthogonal to the normalised good mean.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    work, trials = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    os.chdir(work)
    sys.argv = [sys.argv[0]]  # heretic's Settings parse the command line
    import torch
    import torch.nn.functional as F
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts

    torch.set_grad_enabled(False)
    settings = Settings()
    model = Model(settings)
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    dirs = F.normalize(bad - good, p=2, dim=1)
    if settings.orthogonalize_direction:
        g = F.normalize(good, p=2, dim=1)
        dirs = F.normalize(dirs - (dirs * g).sum(1, keepdim=True) * g, p=2, dim=1)
    for t in trials:
        model.reset_model()
        params = {k: AbliterationParameters(**v) for k, v in t["parameters"].items()}
        model.abliterate(dirs, t["direction_index"], params)
        out = work / "heretic_models" / f"trial_{t['trial']}"
        merged = model.get_merged_model()
        merged.save_pretrained(out)
        model.tokenizer.save_pretrained(out)
        print(f"saved trial {t['trial']} to {out}", flush=True)


if __name__ == "__main__":
    main()
