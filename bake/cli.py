"""Command line: argument parsing and printing only; the work is in bake.compiler, bake.fit, ..."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from . import __version__, guard
from .errors import BakeError, CheckFailed


def _p_fit(sub):
    p = sub.add_parser("fit", help="estimate a spec from source and target texts")
    p.add_argument("--model", required=True, help="model directory, .gguf file, hub id or alias (llama, gemma3, qwen)")
    p.add_argument("--source", required=True, help="texts to steer away from, one per line")
    p.add_argument("--target", default=None, help="texts to steer towards, one per line (not needed by dsas "
                   "when --inner is a spec file)")
    p.add_argument("--method", required=True, help="linear-act | mean-act | gaussian-act | aura | caa | iti-c | "
                   "monotone-pwl | ablate")
    p.add_argument("--sites", default=None, help="comma-separated presets or globs (post-norms, mlp-in, attn-out, "
                   "mlp-out, residual, 'mlp.down_proj:input', ...); default: the method's usual sites")
    p.add_argument("--chat", action="store_true", help="each text as one chat user turn with the generation prompt "
                   "(the tokenizer's template): with --pooling last, the residual where the answer starts")
    p.add_argument("--pooling", default=None, help="mean | last | max over each text's tokens (default: the method's); mean and max "
                   "leave the first token out where it is a BOS or attention sink (decided on the model), "
                   "mean+first / max+first always pool it")
    p.add_argument("--knots", type=int, default=16, help="monotone-pwl: matched quantiles per unit")
    p.add_argument("--direction-layer", type=float, default=None,
                   help="ablate: layer whose residual stream gives the direction (default: the middle one); a "
                   "fraction i+f interpolates between layers i and i+1")
    p.add_argument("--layer-directions", action="store_true", help="ablate: each write removes its own layer's "
                   "direction")
    p.add_argument("--kernel", default=None, help="ablate: per-layer strengths, heretic's kernel per component: "
                   "'attn=MAX,POS,MIN,DIST;mlp=MAX,POS,MIN,DIST' (λ·MAX at layer POS, linearly to λ·MIN at "
                   "distance DIST, nothing beyond)")
    p.add_argument("--system", default=None, help="--chat: the system turn of every text (default: the template's)")
    p.add_argument("--rank", type=int, default=1, help="ablate: remove a rank-k subspace (the mean direction and "
                   "the top k − 1 principal directions of the source texts' offsets)")
    p.add_argument("--orthogonalize", action="store_true", help="ablate: remove from the direction its component "
                   "along the target mean (projected abliteration)")
    p.add_argument("--norm-preserving", action="store_true", help="ablate: keep each writer row's norm "
                   "(biprojected abliteration, exact: three maps per write, all folding)")
    p.add_argument("--reference", default="zero", help="ablate: zero (remove the direction) | target (move it to "
                   "the target texts' mean at each write: affine concept editing; still folds)")
    p.add_argument("--direction", default=None, help="ablate: lda (Σ⁻¹(μs − μt), Σ the diagonal within-class "
                   "covariance; default) | mean (μs − μt, classic abliteration)")
    p.add_argument("--strength", type=float, default=1.0, help="λ stored in the spec (default 1)")
    p.add_argument("--support", default="none", help="none | source-range (affine maps act only inside it)")
    p.add_argument("--no-causal", dest="causal", action="store_false",
                   help="fit every site on clean activations instead of in graph order with earlier maps on")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (default 16; LinEAS and DSAS --joint: per step, default 8)")
    d = p.add_argument_group("dsas (gated steering)")
    d.add_argument("--control", default=None, help="neutral texts the gate should leave alone, one per line")
    d.add_argument("--inner", default=None, help="the map to gate: a spec file, or a method name fitted on "
                   "--source/--target (e.g. mean-act)")
    d.add_argument("--min-accuracy", type=float, default=0.75, help="keep sites whose detector reaches this "
                   "held-out accuracy")
    d.add_argument("--pca", type=int, default=None, help="fit each detector on this many principal components")
    d.add_argument("--joint", action="store_true", help="train gates and per-unit maps together, end to end "
                   "(LinEAS loss source → target plus --retain × drift of the control texts; LinEAS options apply)")
    d.add_argument("--gate-form", default="sigmoid", help="sigmoid: the gate σ(w·x + c) (bakes with --insert-modules "
                   "or into ONNX) | units: the gate as two more units of the layer's MLP, read from the MLP's input "
                   "(folds into a stock checkpoint by widening the MLP; the inner map must add a vector)")
    d.add_argument("--retain", type=float, default=1.0, help="weight of the control-retain term (--joint)")
    g = p.add_argument_group("lineas (end-to-end training)")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--optimizer", default="adam", help="adam | sgd (cosine decay either way)")
    g.add_argument("--l1", type=float, default=0.0, help="per-unit L1 on a − 1 and b (proximal). With Adam a unit "
                   "moves about lr per step, so --l1 acts between 0 and 1 (≥ 1 leaves every unit identity); on "
                   "SmolLM2 post-norms 0.9 kept 22 %% of the units, 0.97 under 1 %%")
    g.add_argument("--group", type=float, default=0.0, help="per-site L2 group penalty, weighted by √d (proximal). "
                   "The loss averages over the L sites where the LinEAS paper sums, so --l1 and --group are the "
                   "paper's weights divided by L (paper λ = L × these); the spec records it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per step and process (gradient "
                   "accumulation; under torchrun each process runs its own, so N processes = N × the batch)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop cleanly and write the best spec so far")
    _placement_args(p, "the model")
    p.add_argument("--out", required=True, help="spec manifest to write (.json; tensors go beside it)")


def _placement_args(p, what: str) -> None:
    """--device and --device-map: where `what` runs."""
    p.add_argument("--device", default="cpu", help=f"where {what} runs: cpu | cuda[:N] | auto (cuda when a GPU is present)")
    p.add_argument("--device-map", default=None, help=f"or spread {what} by accelerate, for models larger than one "
                   "device (auto: layers across GPUs, then CPU)")


def _spec_args(p) -> None:
    """Arguments apply and verify share: the model, the specs, λ, probe prompts, fingerprint check."""
    p.add_argument("--model", required=True)
    p.add_argument("--spec", action="append", required=True, help="spec manifest; repeat to compose in order")
    p.add_argument("--strength", type=float, default=None, help="override the strength of every map")
    p.add_argument("--prompts", default=None, help="extra probe prompts for verify, one per line")
    p.add_argument("--ignore-fingerprint", action="store_true", help="apply a spec fitted on other weights")


def _p_apply(sub):
    p = sub.add_parser("apply", help="bake specs into a stock checkpoint")
    _spec_args(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16 (folding is done in fp32); "
                   "a streaming bake keeps each tensor's stored dtype")
    p.add_argument("--format", default="safetensors", help="safetensors | onnx | gguf | lora | control-vector | "
                   "comma-separated (all in --out; gguf: model-<TYPE>.gguf for llama.cpp / Ollama beside the "
                   "checkpoint; lora: lora/ with a PEFT adapter and a llama.cpp LoRA GGUF; control-vector: "
                   "control-vector.gguf for llama.cpp; for both the runtime's scale = the strength)")
    p.add_argument("--gguf-type", default=None, help="f32 | f16 | bf16 | q8_0 | q4_k_m | iq4_xs | ... (llama.cpp's "
                   "quantizer; default: the type of the --model GGUF, f16 from a directory)")
    p.add_argument("--imatrix", default=None, metavar="FILE", help="an importance matrix for llama.cpp's quantizer: "
                   "calibration texts (bake measures it on the steered model) or llama-imatrix's .gguf; needed by "
                   "iq1_*, iq2_*, iq3_xxs, q2_k_s")
    p.add_argument("--onnx-layout", default="root", help="root: model.onnx beside config.json (Optimum, "
                   "onnxruntime-genai) | onnx: onnx/model.onnx (transformers.js)")
    p.add_argument("--stream", action="store_true", help="never load the whole model: rewrite only the tensors the "
                   "plan touches, shard by shard (the default for a sharded checkpoint with an index json)")
    p.add_argument("--link", action="store_true", help="streaming: hard-link untouched shards instead of copying "
                   "them (same filesystem; the output then shares those files with the source)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the check against the reference")
    p.add_argument("--max-new-tokens", type=int, default=32, help="verify: greedy continuation length per probe")
    p.add_argument("--approximate", action="store_true", help="fold support-masked affine maps as if unbounded "
                   "(a stock checkpoint; verify reports the resulting error)")
    p.add_argument("--insert-modules", action="store_true", help="keep maps that cannot fold as small modules "
                   "(safetensors then carries generated code and needs trust_remote_code=True; ONNX needs nothing)")
    _placement_args(p, "verify (the reference, then each baked format; one copy resident at a time)")


def _p_verify(sub):
    p = sub.add_parser("verify", help="check a baked model against the hooked reference")
    _spec_args(p)
    p.add_argument("--baked", required=True, help="the baked model directory (safetensors and/or ONNX)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime: auto (CUDA when present) | cpu | cuda")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the generated code of a checkpoint with inserted modules (read it first)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--report", default=None, help="write the JSON report here")
    _placement_args(p, "the reference, then each baked format (one copy resident at a time)")


def _p_eval(sub):
    p = sub.add_parser("eval", help="measure toxicity and perplexity of the original and steered model over λ")
    p.add_argument("--model", required=True)
    p.add_argument("--spec", action="append", default=None, help="spec(s) to evaluate hooked, at each --strengths")
    p.add_argument("--baked", default=None, help="a baked model directory, or a .gguf file (run in llama.cpp), to "
                   "evaluate as one more point")
    p.add_argument("--strengths", default="0.25,0.5,0.75,1", help="comma-separated λ values for --spec")
    p.add_argument("--task", default="toxicity,perplexity", help="toxicity, perplexity, refusal (chat-templated "
                   "HarmBench, benign edgy and harmless requests), comma-separated")
    p.add_argument("--system", default=None, help="refusal: a system turn before each request (default: none, "
                   "the chat template's own; heretic's is 'You are a helpful assistant.')")
    p.add_argument("--n-prompts", type=int, default=None, help="refusal: the first N prompts of each set of the "
                   "split (default: all)")
    p.add_argument("--sampled", action="store_true", help="refusal: also sampled responses (temperature 0.7, "
                   "top-p 0.8), one set per --seeds seed, refusal rates pooled over the seeds")
    p.add_argument("--prompts", default=None, help="prompt file for toxicity (default: vendored RTP prefixes)")
    p.add_argument("--split", default="heldout", help="vendored RTP prefixes and FLORES sentences: "
                   "tune (RTP 1-40 of each file, FLORES first half), heldout (the rest, deduplicated) or all")
    p.add_argument("--seeds", default="0,1,2", help="generation seeds, pooled")
    p.add_argument("--n-sentences", type=int, default=200, help="FLORES sentences for perplexity")
    p.add_argument("--sentences", default=None, help="perplexity on these texts (one per line) instead of FLORES, "
                   "e.g. unwanted texts, to screen specs without sampling")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the generated code of a --baked checkpoint with inserted modules (read it first)")
    p.add_argument("--scorer", default="profanity", help="profanity (alt-profanity-check) | hatesonar; comma-separated for several (the first "
                   "gives the headline toxic rate)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda when a GPU is present)")
    p.add_argument("--out", required=True, help="JSON results (resumed if it exists with the same settings)")
    p.add_argument("--plot", default=None, help="PNG plot (default: beside --out)")


def _p_diff(sub):
    p = sub.add_parser("diff", help="compare a steered model with the original: KL, top-1, continuations (CI gate)")
    p.add_argument("--model", required=True, help="the original model")
    p.add_argument("--steered", required=True, help="steered directory (safetensors checkpoint, ONNX export, "
                   "model-*.gguf) or a .gguf file (run in llama.cpp)")
    p.add_argument("--format", default="auto", help="auto | safetensors | onnx | gguf (which one of --steered to load)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime: auto (CUDA when present) | cpu | cuda")
    p.add_argument("--prompts", default=None, help="prompts, one per line (default: 8 probes + 24 held-out "
                   "FLORES sentences)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the generated code of a checkpoint with inserted modules (read it first)")
    p.add_argument("--max-kl", type=float, default=None, help="fail when the mean next-token KL exceeds this")
    p.add_argument("--min-top1", type=float, default=None, help="fail when top-1 agreement falls below this (0-1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy continuation length")
    p.add_argument("--report", default=None, help="HTML report to write")
    p.add_argument("--json", default=None, help="JSON report to write")
    _placement_args(p, "each model (the original, then the steered one; one resident at a time)")


def _check_report(path, flag: str, reads) -> Path:
    """A report, plot or results file: never an input, nor inside one; replaced when it exists."""
    from .exporters import check_file_out

    return check_file_out(path, reads, flag)


def _check_spec_out(out: str, reads, force: bool) -> Path:
    """compose / invert: a .json manifest (and its tensor file) that is no input; an existing one only with
    --force."""
    from .exporters import check_file_out

    if Path(out).suffix != ".json":
        raise BakeError(f"--out: a spec manifest ends in .json, got {out!r}")
    return check_file_out(out, reads, force=force, also=guard.spec_outputs(out))


def _numbers(text: str, field: str, kind=float) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BakeError(f"{field}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v != v or v in (float("inf"), float("-inf")) for v in vals):
        raise BakeError(f"{field}: expected finite numbers, got {text!r}")
    return vals


def _p_search(sub):
    p = sub.add_parser("search", help="abliteration: heretic's parameters by multi-objective search (Optuna)")
    p.add_argument("--model", required=True, help="a chat model (directory, .gguf, hub id or alias)")
    p.add_argument("--source", default="bake:harmful", help="prompts whose refusals go (default: HarmBench, fit split)")
    p.add_argument("--target", default="bake:harmless", help="prompts to keep (default: built harmless, fit split)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--n-prompts", type=int, default=None, help="the first N select-split prompts of each set")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-kl", type=float, default=0.1, help="choose the fewest refusals with KL at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-trials", type=int, default=None, help="random trials before TPE models the front "
                   "(default: Optuna's 10; heretic's is 60 of 200)")
    p.add_argument("--orthogonalize", action="store_true", help="directions orthogonal to the harmless mean "
                   "(heretic's default)")
    p.add_argument("--norm-preserving", action="store_true", help="keep the writers' row norms (heretic's "
                   "default row normalisation, exact here)")
    p.add_argument("--system", default=None, help="system prompt of the scored chats (default: the template's)")
    p.add_argument("--max-rank", type=int, default=1, help="each trial also draws the rank k of the removed "
                   "subspace, 1 … this (bake fit --rank)")
    p.add_argument("--out", required=True, help="directory: trials.json, front.png, chosen.json (written atomically)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def cmd_search(a) -> int:
    from .exporters import check_out, staged
    from .fit import read_texts
    from .models import load
    from .search import SearchConfig, search

    cfg = SearchConfig(trials=a.trials, n_prompts=a.n_prompts, max_new_tokens=a.max_new_tokens,
                       batch_size=a.batch_size, max_kl=a.max_kl, seed=a.seed, startup_trials=a.startup_trials,
                       orthogonalize=a.orthogonalize, norm_preserving=a.norm_preserving, system=a.system,
                       max_rank=a.max_rank)  # checks the counts before anything loads

    out = Path(a.out)
    reads = [*guard.model_inputs(a.model), *guard.file_inputs(("--source file", a.source), ("--target file", a.target))]
    check_out(out, a.force, reads)
    src, tgt = read_texts(a.source, "--source"), read_texts(a.target, "--target")
    loaded = load(a.model)
    check_out(out, a.force, [*reads, ("model directory", loaded.source)])
    with staged(out, a.force) as tmp:
        doc = search(loaded.model, loaded.tokenizer, src, tgt, cfg, tmp)
    c = doc["trials"][doc["chosen"]]
    print(f"chosen trial {c['trial']}: {c['refusals']}/{doc['prompts_select']['harmful']} refusals, KL {c['kl']:.4f} "
          f"(select split; front of {len(doc['front'])}); wrote {a.out}/chosen.json, trials.json, front.png")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bake", description="Bake activation steering into model weights.")
    ap.add_argument("--version", action="version", version=f"bake {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _p_fit(sub)
    _p_apply(sub)
    _p_verify(sub)
    _p_eval(sub)
    _p_diff(sub)
    _p_search(sub)
    p = sub.add_parser("compose", help="compose specs per site, in order, into one spec")
    p.add_argument("spec", nargs="+")
    p.add_argument("-o", "--out", required=True, help="spec manifest to write (.json)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="compose specs fitted on different weights")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    p = sub.add_parser("invert", help="the inverse spec: induces what the spec removes")
    p.add_argument("spec")
    p.add_argument("-o", "--out", required=True, help="spec manifest to write (.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    p = sub.add_parser("inspect", help="print a readable summary of a spec")
    p.add_argument("spec")
    p = sub.add_parser("families", help="supported model families and, per site preset, how each map kind folds")
    p.add_argument("--family", action="append", help="only this family (repeatable)")
    p.add_argument("--type", default=None, help="any causal-LM model_type: the table for the family bake's probe "
                                                "derives from a tiny random model of it")
    p.add_argument("--all", action="store_true", help="every causal-LM model type of transformers: does it bake "
                                                      "and verify with ablate, mean-act and caa, or why not "
                                                      "(the last family sweep, shipped with bake)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    return ap


def cmd_fit(a) -> int:
    """parse → FitConfig → run_fit (reads, checks, loads, fits, distributed under torchrun, writes) → print."""
    from .fit import FitConfig, LineasConfig, run_fit

    lineas = None
    if a.method == "lineas" or a.joint:  # the end-to-end training options (LinEAS, DSAS --joint)
        lineas = LineasConfig(steps=a.steps, lr=a.lr, optimizer=a.optimizer, l1=a.l1, group=a.group, seed=a.seed,
                              max_minutes=a.max_minutes, retain=a.retain, accumulate=a.accumulate)
    config = FitConfig(a.method, a.sites, a.strength, a.support, a.causal, a.batch_size, pooling=a.pooling,
                       knots=a.knots, direction_layer=a.direction_layer, reference=a.reference,
                       direction=a.direction, layer_directions=a.layer_directions,
                       kernel=a.kernel, orthogonalize=a.orthogonalize, norm_preserving=a.norm_preserving,
                       system=a.system, rank=a.rank,
                       lineas=lineas, inner=a.inner, min_accuracy=a.min_accuracy,
                       pca=a.pca, seed=a.seed, joint=a.joint, chat=a.chat,
                       gate_form=a.gate_form)
    result = run_fit(a.model, config, a.out, a.source, a.target, a.control, device=a.device,
                     device_map=a.device_map)
    for line in result.lines:
        print(line)
    return 0


def _verification_line(v: dict) -> str:
    if v.get("kind") == "pipeline":
        line = f"verify: {'PASS' if v['passed'] else 'FAIL'}: {v['prompts']} prompts, {v['steps']} denoising steps"
        if "latent_rel" in v:
            line += f", latent relative error {v['latent_rel']:.3g}, max pixel error {v['pixel_max_abs']:.3g}"
        if "onnx_denoiser_rel" in v:
            line += f", ONNX denoiser relative error {v['onnx_denoiser_rel']:.3g}"
        return line + f" [{v['criterion']}]"
    own = v.get("format_passed", v["passed"])  # the headline is the first format's own verdict
    line = (f"verify: {'PASS' if own else 'FAIL'}: {v['prompts']} prompts, max abs logit error "
            f"{v['max_abs']:.3g} (relative {v['max_rel']:.3g}), greedy identical {v['greedy_same']}/{v['prompts']}"
            f" [{v['criterion']}]" + (f" in {v['seconds']:.1f} s" if "seconds" in v else ""))
    if v.get("without"):
        line += f"; against the spec without {v['without']}"
    lo = v.get("lora")
    if lo:
        line += (f"\nverify (lora, PEFT at scale 1): {'PASS' if lo['passed'] else 'FAIL'}: max abs logit error "
                 f"{lo['max_abs']:.3g} (relative {lo['max_rel']:.3g}), greedy identical {lo['greedy_same']}/"
                 f"{lo['prompts']}")
    for key, what in (("gguf", "gguf {gguf_type}" + (" + control-vector sidecar" if v.get("without") else "")
                               + ", llama.cpp"), ("control-vector", "control vector, llama.cpp"),
                      ("lora-gguf", "LoRA GGUF, llama.cpp at scales 1 and 0")):
        g = v.get(key)
        if g:
            line += (f"\nverify ({what.format(**g)}): {'PASS' if g['passed'] else 'FAIL'}: max abs logit "
                     f"error {g['max_abs']:.3g} (relative {g['max_rel']:.3g}), greedy identical "
                     f"{g['greedy_same']}/{g['prompts']} [{g['criterion']}]")
            if g.get("tensor_types"):
                from .exporters.gguf_lm import summary

                line += f"; written as {summary(g['tensor_types'])}"
            if g.get("note"):
                line += f" ({g['note']})"
    if not v["passed"] and own:  # the headline's format passed; another did not
        failed = [k for k, r in v.items() if isinstance(r, dict) and r.get("passed") is False]
        line += f"\nverify: FAIL overall: {', '.join(failed) or 'another format'} failed"
    return line


def cmd_apply(a) -> int:
    from .compiler import BakeOptions, apply, parse_formats
    from .verify import read_prompts

    opts = BakeOptions(dtype=a.dtype, formats=parse_formats(a.format), onnx_layout=a.onnx_layout, gguf_type=a.gguf_type,
                       strength=a.strength, force=a.force, run_verify=a.verify,
                       prompts=tuple(read_prompts(a.prompts) or ()) or None, check_model=not a.ignore_fingerprint,
                       insert_modules=a.insert_modules, approximate=a.approximate, stream=a.stream or None,
                       link=a.link, inputs=tuple(f for f in (a.prompts, a.imatrix) if f), imatrix=a.imatrix,
                       max_new_tokens=a.max_new_tokens,
                       device=a.device, device_map=a.device_map)
    res = apply(a.model, a.spec, a.out, opts)
    if res.verification:
        print(_verification_line(res.verification))
    inserted = sum(p_ == "insert-modules" for p_, _, _ in res.report)
    loads = (f"from_pretrained(trust_remote_code=True): generated modeling_bake.py, {inserted} inserted module(s)"
             if inserted else "stock from_pretrained")
    how = " + ".join({"safetensors": loads, "onnx": "model.onnx for ONNX Runtime",
                      "gguf": "model-*.gguf for llama.cpp",
                      "lora": "lora/ (PEFT adapter; llama.cpp LoRA GGUF where bake writes GGUF)",
                      "control-vector": "control-vector.gguf for llama.cpp"}[f]
                     for f in opts.formats)
    how = f"streamed; {how}" if res.streamed else how
    print(f"wrote {res.out} in {res.seconds:.1f} s ({how}; config changes: {res.config_changes or 'none'})")
    return 0


def cmd_verify(a) -> int:
    """bake verify: the baked directory's modality (causal LM or pipeline) decides how it is checked."""
    from .compiler import read_specs
    from .modality import VerifyOptions, verify_baked
    from .verify import read_prompts

    specs = read_specs(a.spec, a.strength)
    if a.report:
        _check_report(a.report, "--report", [*guard.spec_inputs(specs, "--spec"), *guard.model_inputs(a.model),
                                             ("baked model", Path(a.baked)), *guard.file_inputs(("prompts", a.prompts))])
    opts = VerifyOptions(prompts=tuple(read_prompts(a.prompts)), max_new_tokens=a.max_new_tokens,
                         check_model=not a.ignore_fingerprint, provider=a.provider, trust_code=a.trust_remote_code,
                         device=a.device, device_map=a.device_map)
    report = verify_baked(a.model, specs, a.baked, opts)
    if a.report:
        from .evaluation import write_json_atomic

        write_json_atomic(Path(a.report), report)
    print(_verification_line(report))
    return 0 if report["passed"] else 1


def cmd_eval(a) -> int:
    """bake eval: parse → EvalConfig (checked by bake.evaluation.prepare) → one sweep → print."""
    from .compiler import read_specs
    from .evaluation import prepare
    from .evaluation.sweep import run, summary_line
    from .verify import read_prompts

    strengths = _numbers(a.strengths, "--strengths")
    seeds = _numbers(a.seeds, "--seeds", int)
    specs = read_specs(a.spec) if a.spec else None
    out = Path(a.out)
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    reads = [*guard.spec_inputs(specs or [], "--spec"), *guard.model_inputs(a.model),
             *guard.model_inputs(a.baked, "--baked model"),
             *guard.file_inputs(("--prompts file", a.prompts), ("--sentences file", a.sentences))]
    _check_report(out, "--out", reads)  # an existing --out is resumed
    _check_report(plot, "--plot", [*reads, ("--out file", out)])
    cfg = prepare(a.task, seeds, read_prompts(a.prompts) if a.prompts else None, a.split, a.n_sentences,
                  a.sentences, a.max_new_tokens, a.scorer, a.batch_size, baked=a.baked, n_prompts=a.n_prompts,
                  system=a.system, sampled=a.sampled)
    doc = run(a.model, cfg, out, specs, strengths, a.baked, plot, device=a.device, trust_code=a.trust_remote_code)
    print("\n".join(summary_line(p) for p in doc["points"]))
    print(f"wrote {out} and {plot}")
    return 0


def cmd_diff(a) -> int:
    """bake diff: one gated comparison (bake.diff.run); exit 1 when a threshold is crossed."""
    from .diff import DiffOptions, run

    reads = [*guard.model_inputs(a.model), *guard.model_inputs(a.steered, "--steered model"),
             *guard.file_inputs(("--prompts file", a.prompts))]
    for flag, path in (("--report", a.report), ("--json", a.json)):
        if path:
            _check_report(path, flag, reads)
    doc = run(DiffOptions(model=a.model, steered=a.steered, fmt=a.format, provider=a.provider, prompts=a.prompts,
                          trust_code=a.trust_remote_code, max_kl=a.max_kl, min_top1=a.min_top1,
                          max_new_tokens=a.max_new_tokens, report=a.report, json=a.json, device=a.device,
                          device_map=a.device_map))
    s = doc["summary"]
    print(f"diff: {s['prompts']} prompts, {s['positions']} positions: mean KL {s['kl_mean']:.4g} (max {s['kl_max']:.4g}), "
          f"top-1 agreement {s['top1_agreement']:.4f}, greedy identical {s['greedy_same']}/{s['prompts']} [{doc['format']}]")
    for f in doc["failed"]:
        print(f"bake diff: FAIL: {f}", file=sys.stderr)
    return 1 if doc["failed"] else 0


def cmd_compose(a) -> int:
    from .algebra import compose
    from .spec import read, write

    specs = [read(p) for p in a.spec]
    out = _check_spec_out(a.out, guard.spec_inputs(specs), a.force)
    spec = compose(specs, check_model=not a.ignore_fingerprint)
    write(spec, out)
    n = sum(len(m) for _, m in spec.sites)
    print(f"wrote {out} ({len(spec.sites)} sites, {n} maps, composed from {len(a.spec)} specs)")
    return 0


def cmd_invert(a) -> int:
    from .algebra import invert
    from .spec import read, write

    source = read(a.spec)
    out = _check_spec_out(a.out, guard.spec_inputs([source]), a.force)
    spec = invert(source)
    write(spec, out)
    print(f"wrote {out} ({len(spec.sites)} sites, inverse of {Path(a.spec).name})")
    return 0


def cmd_inspect(a) -> int:
    from .spec_summary import summary
    from .spec import read

    print("\n".join(summary(read(a.spec))))
    return 0


def _print_sweep(as_json: bool) -> int:
    """`bake families --all`: one line per model type from the shipped sweep."""
    import json

    from .support_table import sweep_verdicts

    version, rows = sweep_verdicts()
    if as_json:
        print(json.dumps({"transformers": version, "rows": rows}, indent=1))
        return 0
    print(f"every causal-LM model type of transformers {version} (the family sweep; `bake families --type T` "
          f"probes one on this machine):")
    width = max(len(r["model_type"]) for r in rows)
    for r in rows:
        why = f" ({r['why']})" if r.get("why") else ""
        print(f"  {r['model_type']:{width}s}  {r.get('family', '-'):8s} {r['status']}{why}")
    return 0


def cmd_families(a) -> int:
    import json

    from .support_table import ALWAYS_INSERTED, KINDS, probed_table, table

    if a.all:
        return _print_sweep(a.json)
    rows = probed_table(a.type) if a.type else table(a.family)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in KINDS}
    pw = max(len(r["preset"]) for r in rows)
    fam = None
    for r in rows:
        if r["family"] != fam:
            fam = r["family"]
            what = "pipeline" if fam.startswith("diffusers") else "model_type: " + ", ".join(r["model_types"])
            print(f"\n{fam} ({what})")
            print(f"  {'preset':{pw}s} " + " ".join(f"{k:{width[k]}s}" for k in KINDS))
        print(f"  {r['preset']:{pw}s} " + " ".join(f"{r[k]:{width[k]}s}" for k in KINDS))
    print(f"\nstock: folds into the stock class and config; stock + flag: the config turns a bias on; relabel: "
          f"saved as that class (the same math); inserted module: needs --insert-modules (generated code, "
          f"trust_remote_code=True) or ONNX. Always inserted: {', '.join(ALWAYS_INSERTED)}.")
    from .families import FAMILIES
    from .support_table import gguf_line

    print("\n--format gguf (llama.cpp, Ollama), per model type: the architecture llama.cpp's converter writes and "
          "the biases its loader reads (probed in llama.cpp: benchmarks/gguf_slots.py). A shift at a layer output "
          "the weights cannot hold goes to llama.cpp's control vector with --format gguf,control-vector.")
    for ad in FAMILIES:
        if ad.modality == "causal-lm" and (not a.family or ad.family in a.family):
            print(f"  {ad.family}: {gguf_line(ad.model_types)}")
    gguf = [f"{ad.family} (llama.cpp {ad.gguf_arch})" for ad in FAMILIES if ad.gguf_arch]
    print(f"From a GGUF source (bake's own writer, its metadata carried over): {', '.join(gguf)} (a Qwen2 "
          f"relabelled as Llama by a fold is written as llama.cpp llama); --format lora writes a llama.cpp LoRA "
          f"only from a GGUF source.")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every staging directory is removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _redeliver(hook):
    """sys.unraisablehook: a Terminated raised while Python ran a __del__ is swallowed there ("Exception
    ignored in ..."); deliver the signal again, so that it lands in ordinary code."""
    def unraisable(info):
        if isinstance(info.exc_value, Terminated):
            signal.raise_signal(signal.SIGTERM)
        else:
            hook(info)
    return unraisable


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    hook = sys.unraisablehook
    sys.unraisablehook = _redeliver(hook)
    try:
        return _run(a)
    finally:
        sys.unraisablehook = hook
        if main_thread:
            signal.signal(signal.SIGTERM, prev)


def _run(a) -> int:
    try:
        return {"fit": cmd_fit, "apply": cmd_apply, "verify": cmd_verify, "eval": cmd_eval, "diff": cmd_diff,
                "compose": cmd_compose, "invert": cmd_invert, "inspect": cmd_inspect,
                "families": cmd_families, "search": cmd_search}[a.cmd](a)
    except BakeError as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return e.exit_code
    except CheckFailed as e:
        print(f"bake: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("bake: interrupted; nothing was written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
