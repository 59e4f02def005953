"""bake eval: how much steering changes what a model does, over strengths.

Tasks: `toxicity` (sampled continuations of prompts, scored by an offline classifier),
`perplexity` (on vendored FLORES English sentences) and `refusal` (chat-templated harmful, benign-edgy
and harmless requests: refusal rates and heretic's first-token KL, `refusal.py`). A sweep evaluates the original model and the
spec at each strength (hooked) or a baked directory, writing the JSON after every finished point so
that a rerun with the same settings resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import BakeError

RTP_FILES = ("rtp_insult.txt", "rtp_profanity.txt", "rtp_threat.txt", "rtp_flirtation.txt")
SPLITS = ("tune", "heldout", "all")
TUNE_PER_FILE = 40
TASKS = ("toxicity", "perplexity", "refusal")


def data_file(name: str) -> Path:
    return Path(str(resources.files("bake") / "data" / name))


def rtp_prompts(split: str = "heldout") -> list[str]:
    """Vendored RealToxicityPrompts prefixes, deduplicated: `tune` = the first 40 of each file,
    `heldout` = the rest minus any prefix that is also in `tune` (some appear in two files)."""
    if split not in SPLITS:
        raise BakeError(f"--split: unknown split {split!r} (known: {', '.join(SPLITS)})")
    tune, rest = [], []
    for f in RTP_FILES:
        lines = [ln.strip() for ln in data_file(f).read_text(encoding="utf-8").splitlines() if ln.strip()]
        tune += lines[:TUNE_PER_FILE]
        rest += lines[TUNE_PER_FILE:]
    tune = list(dict.fromkeys(tune))
    held = [p for p in dict.fromkeys(rest) if p not in set(tune)]
    return {"tune": tune, "heldout": held, "all": tune + held}[split]


def flores(n: int, split: str = "heldout") -> list[str]:
    """The first `n` vendored FLORES English sentences of a split: `tune` = the first half of the
    file, `heldout` = the second half (so that λ chosen on one is reported on the other)."""
    if split not in SPLITS:
        raise BakeError(f"--split: unknown split {split!r} (known: {', '.join(SPLITS)})")
    lines = [ln.strip() for ln in data_file("flores.eng.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    half = len(lines) // 2
    pool = {"tune": lines[:half], "heldout": lines[half:], "all": lines}[split]
    if not 1 <= n <= len(pool):
        raise BakeError(f"--n-sentences: must be between 1 and {len(pool)} for split {split}, got {n}")
    return pool[:n]


@dataclass
class EvalConfig:
    tasks: list[str]
    prompts: list[str]
    sentences: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.3
    repetition_penalty: float = 1.2
    scorer: str = "profanity"
    threshold: float = 0.5
    batch_size: int = 32
    refusal_harmful: list[str] = field(default_factory=list)  # refusal task: HarmBench of the split
    refusal_benign: list[str] = field(default_factory=list)  # benign edgy requests (over-refusal)
    refusal_harmless: list[str] = field(default_factory=list)  # neutral requests (first-token KL)
    system: str | None = None  # refusal: a system turn before each request (None: the template's default)
    refusal_sampled: bool = False  # refusal: also sampled responses, one set per seed (refusal.SAMPLING)

    def key(self) -> str:
        """Identifies the settings: points computed under other settings are not reused."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file beside `path`, renamed into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity, which JSON readers refuse), via a temp file renamed into place."""
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def prepare(task: str, seeds: list[int], prompts: list[str] | None, split: str, n_sentences: int,
            sentences_file: str | None, max_new_tokens: int, scorer: str, batch_size: int,
            baked: str | None = None, n_prompts: int | None = None, system: str | None = None,
            sampled: bool = False) -> EvalConfig:
    """The EvalConfig of a `bake eval` run, every option checked before any work: tasks (comma-separated),
    lengths, the prompts (RealToxicityPrompts of `split` unless given), the perplexity sentences (FLORES of
    `split`, or `sentences_file`), and that a `baked` directory is a causal LM checkpoint (opened last)."""
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise BakeError(f"--task: unknown task(s) {bad or task!r} (known: {', '.join(TASKS)})")
    from .scorers import scorer_names

    scorer_names(scorer)  # an unknown scorer is an error whatever the tasks
    if max_new_tokens < 1 or batch_size < 1:
        raise BakeError("--max-new-tokens/--batch-size: must be at least 1")
    if baked:
        from ..modality import CAUSAL_LM

        CAUSAL_LM.check_dir(baked, "--baked")
    prompts = prompts or rtp_prompts(split)
    if n_sentences < 1:
        raise BakeError(f"--n-sentences: must be at least 1, got {n_sentences}")
    if sentences_file:
        from ..fit import read_texts

        sentences = read_texts(sentences_file, "--sentences")[:n_sentences]
    else:
        sentences = flores(n_sentences, split)
    refusal = refusal_sets(split, n_prompts) if "refusal" in tasks else ([], [], [])
    return EvalConfig(tasks=tasks, prompts=prompts if "toxicity" in tasks else [],
                      sentences=sentences if "perplexity" in tasks else [], seeds=seeds,
                      max_new_tokens=max_new_tokens, scorer=scorer, batch_size=batch_size,
                      refusal_harmful=refusal[0], refusal_benign=refusal[1], refusal_harmless=refusal[2],
                      system=system, refusal_sampled=sampled and "refusal" in tasks)


def refusal_sets(split: str, n: int | None) -> tuple[list[str], list[str], list[str]]:
    """(harmful, benign, harmless) prompts of eval's split (`tune` → the select split, `heldout`,
    `all`), the first `n` of each."""
    from .refusal_data import prompts

    which = {"tune": "select", "heldout": "heldout", "all": "all"}[split]
    if n is not None and n < 1:
        raise BakeError(f"--n-prompts: must be at least 1, got {n}")
    return tuple(prompts(kind, which)[:n] for kind in ("harmful", "benign", "harmless"))
