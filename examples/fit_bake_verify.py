"""Fit → bake → verify through the `bake` CLI, on the embedded model `llama` (SmolLM2-135M-Instruct).

    python examples/fit_bake_verify.py [OUT_DIR]     # default out/fit_bake_verify; a few minutes on CPU

1. `bake fit`: one direction of the residual stream (LDA, after layer 15) from the vendored fitting
   sets in examples/data/ (the recipe of examples/detox.json), stored at λ = 1.39;
2. `bake inspect`: a readable summary of the spec;
3. `bake apply`: fold it into the weights, a stock checkpoint (apply verifies by default; here
   `--no-verify`, so that step 4 shows the check on its own);
4. `bake verify`: baked checkpoint vs the hooked reference, report in OUT_DIR/verify.json.

Each step stops the script when its exit code is not 0 (1: a difference found, 2: bad input).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
BAKE = [shutil.which("bake")] if shutil.which("bake") else [sys.executable, "-m", "bake"]


def bake(*args: str) -> None:
    print("$ bake", " ".join(args), flush=True)
    subprocess.run([*BAKE, *args], check=True)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/fit_bake_verify")
    out.mkdir(parents=True, exist_ok=True)
    spec, baked = out / "detox.json", out / "steered"
    bake("fit", "--model", "llama", "--method", "ablate", "--direction-layer", "15",
         "--source", str(DATA / "detox_fit_toxic.txt"), "--target", str(DATA / "detox_fit_benign.txt"),
         "--strength", "1.39", "--out", str(spec))
    bake("inspect", str(spec))
    bake("apply", "--model", "llama", "--spec", str(spec), "--out", str(baked), "--force", "--no-verify")
    bake("verify", "--model", "llama", "--spec", str(spec), "--baked", str(baked),
         "--report", str(out / "verify.json"))
    print(f"baked checkpoint: {baked} (loads with stock AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
