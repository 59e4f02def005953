"""Distributed fit: two processes with the gloo backend on CPU give the single-process spec; a rank
that dies makes the other one exit with an error, not hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bake.spec import read
from conftest import TEXTS

TOXIC = [t for t in TEXTS if any(w in t for w in ("idiot", "worst", "stupid", "terrible", "fool"))] * 2
KIND = [t for t in TEXTS if t not in TOXIC] * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m bake ARGS`. A launch in which a rank
    aborted with "terminate called without an active exception" (a C++ std::terminate outside any
    Python code: seen once in 21 runs of the DSAS-joint case here, in a full-suite run, never
    again in 20 runs of that test alone) is run once more on a fresh port; any other failure is
    returned as is."""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "bake"] + args, env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    return proc


def fit_args(tiny_dir, tmp_path, method: str, out: Path) -> list[str]:
    (tmp_path / "src.txt").write_text("\n".join(TOXIC) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(KIND) + "\n")
    return ["fit", "--model", str(tiny_dir), "--source", str(tmp_path / "src.txt"), "--target",
            str(tmp_path / "tgt.txt"), "--method", method, "--out", str(out), "--batch-size", "3"]


@pytest.mark.parametrize("method", ["linear-act", "ablate"])
def test_two_ranks_equal_one_process(tiny_dir, tmp_path, method):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs
    single = subprocess.run([sys.executable, "-m", "bake"] + fit_args(tiny_dir, tmp_path, method, one), env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    proc = torchrun(fit_args(tiny_dir, tmp_path, method, two), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    a, b = read(one), read(two)
    assert [s for s, _ in a.sites] == [s for s, _ in b.sites]
    worst = 0.0
    for (_, ma), (_, mb) in zip(a.sites, b.sites):
        for k, t in ma[0].tensors.items():
            worst = max(worst, float((t - mb[0].tensors[k]).abs().max() / t.abs().max().clamp_min(1.0)))
    assert worst <= 1e-6, worst
    assert b.provenance["world_size"] == 2 and b.provenance["n_source"] == len(TOXIC)


def worst_rel(a, b) -> float:
    assert [s for s, _ in a.sites] == [s for s, _ in b.sites]
    worst = 0.0
    for (_, ma), (_, mb) in zip(a.sites, b.sites):
        ta = {**ma[0].tensors, **(ma[0].inner.tensors if ma[0].inner else {})}
        tb = {**mb[0].tensors, **(mb[0].inner.tensors if mb[0].inner else {})}
        assert ta.keys() == tb.keys()
        for k, t in ta.items():
            worst = max(worst, float((t - tb[k]).abs().max() / t.abs().max().clamp_min(1.0)))
    return worst


@pytest.mark.parametrize("extra", [["--method", "lineas"], ["--method", "dsas", "--joint", "--optimizer", "sgd"]],
                         ids=["lineas", "dsas-joint"])
def test_lineas_under_ddp_equals_one_process_accumulating(tiny_dir, tmp_path, extra):
    """LinEAS by DistributedDataParallel: 2 ranks, one micro-batch each per step, give the spec of one
    process accumulating 2 micro-batches (micro-batch j draws from its own seeded generator)."""
    (tmp_path / "ctrl.txt").write_text("\n".join(KIND) + "\n")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--batch-size", "4", "--steps", "12", "--lr", "0.05", "--sites", "post-norms",
              "--control", str(tmp_path / "ctrl.txt")] + extra
    single = subprocess.run([sys.executable, "-m", "bake"] + fit_args(tiny_dir, tmp_path, "mean-act", one) + common
                            + ["--accumulate", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    proc = torchrun(fit_args(tiny_dir, tmp_path, "mean-act", two) + common, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read(one), read(two)
    run_a, run_b = a.params["run"], b.params["run"]
    assert run_a["micro_batches_per_step"] == run_b["micro_batches_per_step"] == 2
    assert (run_a["processes"], run_b["processes"]) == (1, 2)
    assert run_b["loss_last"] < run_b["loss_first"]  # it trained
    assert abs(run_a["loss_last"] - run_b["loss_last"]) <= 1e-5 * abs(run_a["loss_last"])
    worst = worst_rel(a, b)
    assert worst <= 1e-6, worst
    # and it is not the one-micro-batch run: the second rank's samples changed the answer
    plain = subprocess.run([sys.executable, "-m", "bake"] + fit_args(tiny_dir, tmp_path, "mean-act", tmp_path / "p.json")
                           + common, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert worst_rel(a, read(tmp_path / "p.json")) > 1e-3


def test_a_dead_rank_does_not_hang_the_other(tiny_dir, tmp_path):
    """Rank 1 dies before its first collective; rank 0 must fail with an error well before the timeout."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys\n"
        "import bake.fit.distributed as d\n"
        "if os.environ['RANK'] == '1':\n"
        "    d.gather_rows = lambda *a, **k: os._exit(3)\n"
        "    import bake.fit.collect as c\n"
        "    c.gather_texts = lambda *a, **k: os._exit(3)\n"
        "from bake.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    port = str(free_port())
    procs = []
    t0 = time.time()
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "BAKE_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)] + fit_args(tiny_dir, tmp_path, "mean-act",
                                                                               tmp_path / "x.json"),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    codes = [p.wait(timeout=240) for p in procs]
    err0 = procs[0].stderr.read()
    assert codes[1] == 3
    assert codes[0] != 0 and "distributed fit" in err0, err0[-2000:]
    assert time.time() - t0 < 200
    assert not (tmp_path / "x.json").exists()


def test_device_map_auto_fit_equals_plain(tiny_dir):
    """`--device-map auto` loads through accelerate (here: all on the CPU); the hooks and the fit are the same."""
    from bake.fit import FitConfig, fit
    from bake.models import load

    plain, mapped = load(str(tiny_dir)), load(str(tiny_dir), device_map="auto")
    assert all(p.device.type == "cpu" for p in mapped.model.parameters())  # no GPU here: accelerate keeps it on CPU
    a = fit(plain.model, plain.tokenizer, TOXIC, KIND, FitConfig("mean-act"), progress=False)
    b = fit(mapped.model, mapped.tokenizer, TOXIC, KIND, FitConfig("mean-act"), progress=False)
    for (_, ma), (_, mb) in zip(a.sites, b.sites):
        assert torch.allclose(ma[0].tensors["b"], mb[0].tensors["b"], atol=1e-6)
