"""Abliteration head-to-head: heretic itself (heretic-llm, in its own virtual environment) and
`bake search`, on the same model, prompt splits, system prompt, response length and trial budget,
both fronts then scored by one evaluator on held-out prompts. Writes
benchmarks/results/abliteration_vs_heretic.json and docs/abliteration-vs-heretic.png (`_seedN` added to
both names for `--seed N` other than 0, or `--suffix`).

    python -m venv ~/heretic-venv && ~/heretic-venv/bin/pip install torch==2.13.0 heretic-llm==1.4.0
    python benchmarks/abliteration_vs_heretic.py --heretic ~/heretic-venv/bin/heretic \\
        [--trials 8 --startup 4 --n-select 16 --select-tokens 24 --n-heldout 30 --heldout-tokens 48]

1. Prompts: bake's vendored splits (bake/evaluation/refusal_data.py) written as text files; heretic's
   `good_prompts` / `bad_prompts` are the fit splits (harmless / HarmBench), its evaluation prompts the
   first `--n-select` of the select splits, as bake search's are.
2. heretic runs its own study (its defaults otherwise: orthogonalised directions, "full" row
   normalisation as a rank-3 LoRA, multivariate TPE) with `n_trials`, `n_startup_trials`, `seed`,
   `max_response_length`, `batch_size` and `system_prompt` set to the shared values, `response_prefix`
   empty (its prefix check would cost 160 extra generations). Its trials are read from its journal.
3. bake search runs with the same budget and the same variant (`--orthogonalize --norm-preserving`:
   exact maps, where heretic stores a rank-3 approximation).
4. Each tool's Pareto front (select split) is scored on held-out prompts (`--n-heldout` of each set,
   `--heldout-tokens` greedy tokens) by bake's evaluator (`bake.evaluation.refusal`: heretic's marker
   rule, the opening rule, over-refusal on benign prompts, heretic's first-token KL): heretic's front as
   the checkpoints heretic's own code merges (benchmarks/heretic_export.py, in heretic's venv), bake's
   as hooked specs. bake's chosen spec is then baked and verified (`bake apply`).
Stages write their results into --work and are skipped when rerun.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "abliteration_vs_heretic{}.json"  # "" for seed 0, else "_seedN"
PLOT = ROOT / "docs" / "abliteration-vs-heretic{}.png"


def suffix(a) -> str:
    """The run's name suffix: --suffix, else "" for seed 0 and "_seedN" for seed N."""
    return a.suffix if a.suffix is not None else "" if a.seed == 0 else f"_seed{a.seed}"


def default_system(tok) -> str:
    """The system turn the chat template writes when none is given (Qwen2.5: "You are Qwen, …")."""
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    if not m:
        raise SystemExit("this benchmark reads the template's default system turn (a ChatML template)")
    return m.group(1)


def write_prompts(work: Path, n_select: int) -> dict[str, Path]:
    from bake.evaluation.refusal_data import prompts

    files = {}
    for kind in ("harmful", "harmless"):
        for split, n in (("fit", None), ("select", n_select)):
            p = work / f"{kind}_{split}.txt"
            p.write_text("\n".join(prompts(kind, split)[:n]) + "\n", encoding="utf-8")
            files[f"{kind}_{split}"] = p
    return files


def heretic_config(work: Path, model_dir: Path, files: dict, a, system: str) -> None:
    q = json.dumps  # TOML basic strings accept JSON string escapes
    lines = [f"model = {q(str(model_dir))}", f"n_trials = {a.trials}", f"n_startup_trials = {a.startup}",
             f"seed = {a.seed}", f"batch_size = {a.batch_size}", f"max_response_length = {a.select_tokens}",
             'response_prefix = ""', f"system_prompt = {q(system)}", 'dtypes = ["float32"]',
             f"study_checkpoint_dir = {q(str(work / 'heretic_study'))}", ""]
    for key, f in (("good_prompts", "harmless_fit"), ("bad_prompts", "harmful_fit"),
                   ("good_evaluation_prompts", "harmless_select"), ("bad_evaluation_prompts", "harmful_select")):
        lines += [f"[{key}]", f"dataset = {q(str(files[f]))}", ""]
    (work / "config.toml").write_text("\n".join(lines), encoding="utf-8")


def run_heretic(work: Path, heretic: str, timeout: int) -> dict:
    """heretic's study (its interactive menu at the end gets no terminal and stops it); its trials."""
    done = work / "heretic_trials.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    with open(work / "heretic.log", "w") as log:
        subprocess.run([heretic], cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = next((work / "heretic_study").glob("*.jsonl"))
    study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = [{"trial": t.number, "refusals": t.user_attrs["refusals"], "kl": t.user_attrs["kl_divergence"],
               "direction_index": t.user_attrs["direction_index"], "parameters": t.user_attrs["parameters"],
               "base_refusals": t.user_attrs["base_refusals"]}
              for t in study.trials if t.state.name == "COMPLETE"]
    doc = {"seconds": round(seconds), "trials": trials, "front": pareto(trials)}
    done.write_text(json.dumps(doc, indent=1))
    return doc


def pareto(rows: list[dict]) -> list[int]:
    """Trials no other trial beats on both refusals and KL (ties kept once)."""
    front, seen = [], set()
    for r in sorted(rows, key=lambda r: (r["refusals"], r["kl"])):
        if not front or r["kl"] < min(x["kl"] for x in front):
            if (r["refusals"], r["kl"]) not in seen:
                front.append(r)
                seen.add((r["refusals"], r["kl"]))
    return [r["trial"] for r in front]


def run_bake(work: Path, loaded, a, system: str) -> dict:
    from bake.evaluation.refusal_data import prompts
    from bake.search import SearchConfig, search

    done = work / "bake_search" / "trials.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = SearchConfig(trials=a.trials, n_prompts=a.n_select, max_new_tokens=a.select_tokens, batch_size=a.batch_size,
                       seed=a.seed, startup_trials=a.startup, orthogonalize=True, norm_preserving=True,
                       system=system, max_kl=a.max_kl)
    t0 = time.perf_counter()
    doc = search(loaded.model, loaded.tokenizer, prompts("harmful", "fit"), prompts("harmless", "fit"), cfg,
                 work / "bake_search")
    doc["seconds"] = round(time.perf_counter() - t0)
    done.write_text(json.dumps(doc, indent=1))
    return doc


def heldout(work: Path, loaded, heretic_doc: dict, bake_doc: dict, a, heretic_python: str, system: str) -> dict:
    """Every front point of both tools (and the original) on the held-out split, one evaluator."""
    from transformers import AutoModelForCausalLM

    from bake.evaluation import EvalConfig, refusal_sets
    from bake.evaluation.refusal import refusal
    from bake.runtime import steered
    from bake.spec import read

    path = work / "heldout.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    harmful, benign, harmless = refusal_sets("heldout", a.n_heldout)
    cfg = EvalConfig(tasks=["refusal"], prompts=[], sentences=[], max_new_tokens=a.heldout_tokens, batch_size=a.batch_size,
                     refusal_harmful=harmful, refusal_benign=benign, refusal_harmless=harmless, system=system)
    tok = loaded.tokenizer
    base = refusal(loaded.model, tok, cfg, None)["first_token_logprobs"]

    def score(key: str, model) -> None:
        if key in doc:
            return
        r = refusal(model, tok, cfg, base)
        doc[key] = {"refusals": r["harmful"]["refusals"], "prompts": r["harmful"]["prompts"],
                    "opening_rate": r["harmful"]["opening_refusal_rate"], "benign_rate": r["benign"]["refusal_rate"],
                    "kl": r["harmless_kl"]}
        path.write_text(json.dumps(doc, indent=1))
        print(f"held-out {key}: {doc[key]}", flush=True)

    score("original", loaded.model)
    for t in bake_doc["front"]:
        with steered(loaded.model, [read(work / "bake_search" / "front" / f"trial_{t}.json")]):
            score(f"bake/{t}", loaded.model)
    todo = [t for t in heretic_doc["trials"] if t["trial"] in heretic_doc["front"] and f"heretic/{t['trial']}" not in doc]
    if todo:
        (work / "heretic_front.json").write_text(json.dumps(todo))
        subprocess.run([heretic_python, str(ROOT / "benchmarks" / "heretic_export.py"), str(work),
                        str(work / "heretic_front.json")], check=True)
    for t in heretic_doc["front"]:
        d = work / "heretic_models" / f"trial_{t}"
        if f"heretic/{t}" not in doc:
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            score(f"heretic/{t}", m)
            del m
    return doc


def bake_chosen(work: Path, model_dir: Path) -> dict:
    """bake's chosen spec, baked and verified as a user would (`bake apply`)."""
    from bake import compiler

    done = work / "baked_report.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    res = compiler.apply(str(model_dir), [str(work / "bake_search" / "chosen.json")], work / "baked",
                         log=lambda *_: None)
    v = res.verification
    doc = {"passed": v["passed"], "max_rel": v["max_rel"], "greedy_same": v["greedy_same"], "prompts": v["prompts"],
           "config_changes": res.config_changes, "seconds": round(time.perf_counter() - t0)}
    done.write_text(json.dumps(doc, indent=1))
    return doc


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, split in zip(axes, ("select", "heldout")):
        for tool, colour in (("heretic", "tab:orange"), ("bake", "tab:blue")):
            pts = doc[split][tool]
            ax.plot([p["kl"] for p in pts], [p["refusals"] for p in pts], "o-", color=colour, label=tool)
        if split == "heldout":
            ax.axhline(doc["heldout"]["original"]["refusals"], color="grey", ls=":", label="original")
        ax.set_xlabel("first-token KL (harmless prompts)")
        ax.set_ylabel("refusals (heretic's markers)")
        ax.set_title(f"{split} split: Pareto fronts")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heretic", required=True, help="heretic's console script in its own venv")
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--startup", type=int, default=4)
    ap.add_argument("--n-select", type=int, default=16)
    ap.add_argument("--select-tokens", type=int, default=24)
    ap.add_argument("--n-heldout", type=int, default=30)
    ap.add_argument("--heldout-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-kl", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--suffix", default=None, help="added to the result, plot and work names (default: '' for "
                    "seed 0, else _seedN)")
    ap.add_argument("--work", default=None, help="stage results (default ~/.cache/bake/heretic_vs_bake[_seedN])")
    a = ap.parse_args()
    from bake.models import load
    from bake.models.loading import resolve

    work = Path(a.work or Path.home() / ".cache" / "bake" / f"heretic_vs_bake{suffix(a)}")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(resolve(a.model))
    loaded = load(a.model)
    system = default_system(loaded.tokenizer)
    files = write_prompts(work, a.n_select)
    heretic_config(work, model_dir, files, a, system)
    h = run_heretic(work, a.heretic, a.timeout)
    b = run_bake(work, loaded, a, system)
    held = heldout(work, loaded, h, b, a, str(Path(a.heretic).parent / "python"), system)
    baked = bake_chosen(work, model_dir)
    sel = {"heretic": [next(t for t in h["trials"] if t["trial"] == i) for i in h["front"]],
           "bake": [b["trials"][i] for i in b["front"]]}
    doc = {"model": a.model, "system": system, "trials": a.trials, "startup_trials": a.startup, "seed": a.seed,
           "select": {"prompts": a.n_select, "tokens": a.select_tokens,
                      **{k: [{"trial": r["trial"], "refusals": r["refusals"], "kl": r["kl"]} for r in v]
                         for k, v in sel.items()}},
           "heldout": {"prompts": a.n_heldout, "tokens": a.heldout_tokens, "original": held["original"],
                       **{k: [{"trial": r["trial"], **held[f"{k}/{r['trial']}"]} for r in v] for k, v in sel.items()}},
           "seconds": {"heretic": h["seconds"], "bake": b["seconds"]},
           "heretic_all": [{k: t[k] for k in ("trial", "refusals", "kl")} for t in h["trials"]],
           "bake_all": [{k: t[k] for k in ("trial", "refusals", "kl")} for t in b["trials"]],
           "bake_chosen": {"trial": b["chosen"], "baked": baked}}
    result = Path(str(RESULT).format(suffix(a)))
    result.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, Path(str(PLOT).format(suffix(a))))
    print(json.dumps({k: doc[k] for k in ("select", "heldout", "seconds", "bake_chosen")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
