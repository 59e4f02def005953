"""`bake search`: abliteration's parameters chosen by a multi-objective search, as heretic does, on
bake's fit/select splits, with the result a spec that folds and verifies.

1. Directions, once: `bake fit --method ablate --layer-directions` on chat-formatted `--source`
   (harmful) and `--target` (harmless) prompts, last prompt token, mean difference: u_l per layer.
2. Each trial (Optuna's multi-objective TPE, seeded) draws heretic's parameters: the direction index
   (a fraction between two layers' directions, or each write its own layer's) and the kernel per
   component (attn, mlp): MAX, POS, MIN, DIST. The spec they make is hooked on the model and scored on
   the *select* split: refusals of the harmful prompts (the marker rule, greedy) and heretic's
   first-token KL on the harmless ones. Both are minimised. With `max_rank` K > 1 each trial also draws
   the rank k ≤ K of the removed subspace (`bake fit --rank`: the mean direction and the top k − 1
   principal directions; the directions are fitted once at rank K and a trial keeps the first k
   columns, which are the rank-k fit itself); a rank-k trial takes whole layers (a subspace does
   not interpolate), so its direction index is rounded.
3. Written to `--out`: the original's refusals and every trial (`trials.json`), the Pareto front plot
   (`front.png`), each front point's spec (`front/trial_N.json`) and the chosen
   spec (`chosen.json`): the front point with the fewest refusals among those with KL ≤ `--max-kl`
   (the lowest KL when none is). Report it on the held-out split with `bake eval --task refusal`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import BakeError
from .evaluation import write_json_atomic
from .evaluation.refusal import chat_texts, first_token_logprobs, heretic_kl, is_refusal, responses
from .evaluation.refusal_data import prompts
from .fit import FitConfig, fit
from .families import adapter_for
from .fit.ablate import KERNEL_PARTS, components, interpolated, kernel_weight, norm_preserving_maps, writer_weight
from .maps import Map
from .runtime import steered
from .spec import Spec, write


@dataclass
class SearchConfig:
    trials: int = 20
    n_prompts: int | None = None  # per select set (None: all)
    max_new_tokens: int = 32
    batch_size: int = 16
    max_kl: float = 0.1
    seed: int = 0
    startup_trials: int | None = None  # random trials first (None: Optuna's default, 10)
    orthogonalize: bool = False  # directions orthogonal to the harmless mean (heretic's default)
    norm_preserving: bool = False  # biprojected: writer rows keep their norms (heretic's default, exact)
    system: str | None = None  # system prompt of the scored chats (None: the template's)
    max_rank: int = 1  # > 1: each trial draws the rank of the removed subspace, 1 … max_rank

    def __post_init__(self) -> None:
        """Bad counts are a BakeError naming the flag, before any model is loaded."""
        if self.trials < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or (
                self.n_prompts is not None and self.n_prompts < 1):
            raise BakeError("--trials/--max-new-tokens/--batch-size/--n-prompts: must be at least 1")
        if self.max_rank < 1:
            raise BakeError(f"--max-rank: must be at least 1, got {self.max_rank}")
        if not math.isfinite(self.max_kl) or self.max_kl < 0:
            raise BakeError(f"--max-kl: must be a finite KL of at least 0, got {self.max_kl}")
        if self.startup_trials is not None and self.startup_trials < 0:
            raise BakeError(f"--startup-trials: must be at least 0, got {self.startup_trials}")

    def check_inputs(self, model, n_source: int) -> None:
        """Counts that depend on the model and the texts: a subspace no wider than the residual stream,
        spanned by the mean direction and at most one principal direction per source text."""
        hidden = model.get_input_embeddings().weight.shape[1]
        most = min(hidden, n_source + 1)
        if self.max_rank > most:
            raise BakeError(f"--max-rank: {self.max_rank} exceeds the largest subspace this model and --source give "
                            f"({most}: hidden size {hidden}, {n_source} source texts)")


def search(model, tok, source: list[str], target: list[str], cfg: SearchConfig, out: Path, log=print) -> dict:
    """The search above; returns the summary written to `out/trials.json`."""
    try:
        import optuna
    except ImportError as e:
        raise BakeError("bake search needs optuna (pip install optuna)") from e
    cfg.check_inputs(model, len(source))
    base = fit(model, tok, source, target, FitConfig("ablate", direction="mean", pooling="last", chat=True,
                                                     layer_directions=True, orthogonalize=cfg.orthogonalize,
                                                     system=cfg.system, rank=cfg.max_rank))
    dirs = {_layer(n): maps[0].tensors["U"] for n, maps in base.sites}
    harmful = chat_texts(tok, prompts("harmful", "select")[:cfg.n_prompts], cfg.system)
    harmless = chat_texts(tok, prompts("harmless", "select")[:cfg.n_prompts], cfg.system)
    writers = {n: writer_weight(model, info) for n, info in adapter_for(model).sites(model).items()
               if cfg.norm_preserving and n in dict(base.sites)}
    original = first_token_logprobs(model, tok, harmless, cfg.batch_size)
    baseline = sum(map(is_refusal, responses(model, tok, harmful, cfg.max_new_tokens, cfg.batch_size)))
    log(f"original: {baseline}/{len(harmful)} refusals")
    n_layers = max(dirs) + 1
    comp = components(adapter_for(model), model)
    rows = []

    def objective(trial) -> tuple[float, float]:
        params = _draw(trial, n_layers, cfg.max_rank)
        spec = _spec(base, dirs, comp, params, writers)
        with steered(model, [spec]):
            said = responses(model, tok, harmful, cfg.max_new_tokens, cfg.batch_size)
            kl = heretic_kl(first_token_logprobs(model, tok, harmless, cfg.batch_size), original)
        refusals = sum(map(is_refusal, said))
        rows.append({"trial": trial.number, "params": params, "refusals": refusals, "kl": kl})
        log(f"trial {trial.number}: {refusals}/{len(harmful)} refusals, KL {kl:.4f}")
        return float(refusals), kl

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a stopped trial is bake's to report, not a traceback
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=_sampler(optuna, cfg))
    study.optimize(objective, n_trials=cfg.trials)
    front = sorted({t.number for t in study.best_trials})
    chosen = _choose([rows[i] for i in front], cfg.max_kl)
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(base, dirs, comp, chosen["params"], writers)
    spec.params["search"] = {"trial": chosen["trial"], "refusals_select": chosen["refusals"],
                             "kl_select": chosen["kl"], "prompts_select": len(harmful)}
    write(spec, out / "chosen.json")
    for r in (rows[i] for i in front):  # every front point as a spec: report them on held-out prompts
        (out / "front").mkdir(exist_ok=True)
        write(_spec(base, dirs, comp, r["params"], writers), out / "front" / f"trial_{r['trial']}.json")
    doc = {"prompts_select": {"harmful": len(harmful), "harmless": len(harmless)}, "original_refusals": baseline,
           "trials": rows,
           "front": front, "chosen": chosen["trial"], "max_kl": cfg.max_kl, "seed": cfg.seed,
           "startup_trials": cfg.startup_trials, "orthogonalize": cfg.orthogonalize,
           "norm_preserving": cfg.norm_preserving, "system": cfg.system, "max_rank": cfg.max_rank}
    write_json_atomic(out / "trials.json", doc)
    _plot(doc, out / "front.png")
    return doc


def _draw(trial, n_layers: int, max_rank: int = 1) -> dict:
    """heretic's search space: the direction index (or per layer), and the kernel per component; and the
    rank when `max_rank` > 1."""
    per_layer = trial.suggest_categorical("per_layer", [False, True])
    p = {"direction_index": None if per_layer else trial.suggest_float("direction_index", 0.4 * (n_layers - 1),
                                                                      0.9 * (n_layers - 1))}
    for k in KERNEL_PARTS:
        top = trial.suggest_float(f"{k}_max", 0.8, 1.5)
        pos = trial.suggest_float(f"{k}_pos", 0.6 * (n_layers - 1), n_layers - 1)
        low = trial.suggest_float(f"{k}_min", 0.0, 1.0) * top
        dist = trial.suggest_float(f"{k}_dist", 1.0, max(1.5, 0.6 * (n_layers - 1)))
        p[k] = (top, pos, low, dist)
    if max_rank > 1:
        p["rank"] = trial.suggest_int("rank", 1, max_rank)
    return p


def _sampler(optuna, cfg: SearchConfig):
    """Multivariate TPE (heretic's: 128 candidates per step), seeded; `startup_trials` random ones first."""
    kw = {} if cfg.startup_trials is None else {"n_startup_trials": cfg.startup_trials}
    return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_ei_candidates=128, **kw)


def _spec(base: Spec, dirs: dict, comp: dict[str, str], params: dict, writers: dict | None = None) -> Spec:
    """The ablation spec of one parameter set: each write's strength from its component's kernel; with
    `writers` (site → writer weight), the norm-preserving maps."""
    sites = []
    for name, _ in base.sites:
        layer = _layer(name)
        lam = kernel_weight(params[comp[name]], layer)
        if lam == 0:
            continue
        U = _basis(dirs, layer, params["direction_index"], params.get("rank", 1))
        sites.append((name, norm_preserving_maps(writers[name], U, lam) if writers else
                      [Map("projection", lam, {"U": U})]))
    if not sites:
        sites = [(base.sites[0][0], [Map("projection", 0.0, {"U": dirs[_layer(base.sites[0][0])][:, :1]})])]
    kernel = ";".join(f"{k}={','.join(f'{v:.4g}' for v in params[k])}" for k in KERNEL_PARTS)
    return Spec(sites, method="ablate", params={**base.params, "kernel": kernel, "norm_preserving": bool(writers),
                                                "direction_layer": params["direction_index"],
                                                "rank": params.get("rank", 1)},
                provenance=dict(base.provenance), model=dict(base.model))


def _basis(dirs: dict, layer: int, at: float | None, rank: int):
    """U of one write: the first `rank` columns of its own layer's basis (`at` None), else of the direction
    index's: interpolated between two layers for one direction, the nearest layer's for a subspace."""
    if at is None:
        return dirs[layer][:, :rank]
    if rank == 1:
        return interpolated({i: d[:, :1] for i, d in dirs.items()}, at, len(dirs))
    return dirs[min(round(at), len(dirs) - 1)][:, :rank]


def _layer(site: str) -> int:
    return next(int(p) for p in site.split(".") if p.isdigit())


def _choose(front: list[dict], max_kl: float) -> dict:
    ok = [r for r in front if r["kl"] <= max_kl]
    return min(ok, key=lambda r: (r["refusals"], r["kl"])) if ok else min(front, key=lambda r: r["kl"])


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, front = doc["trials"], set(doc["front"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r["kl"] for r in rows], [r["refusals"] for r in rows], c="#999", s=18, label="trials")
    f = sorted((r for r in rows if r["trial"] in front), key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in f], [r["refusals"] for r in f], "o-", color="#1f77b4", label="Pareto front")
    c = rows[doc["chosen"]]
    ax.plot([c["kl"]], [c["refusals"]], "*", ms=14, color="#d62728", label="chosen")
    ax.plot([0.0], [doc["original_refusals"]], "s", ms=9, mfc="none", color="#2ca02c", label="original")
    ax.set_xlabel("first-token KL on harmless prompts (select split)")
    ax.set_ylabel(f"refusals of {doc['prompts_select']['harmful']} harmful prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
