#!/usr/bin/env bash
# Syntax-checks hybrid_engine/csrc/cuda/bindings.cpp (the torch <-> CUDA kernel layer) against
# torch's headers when the installed torch is a CPU build, which cannot link it. A CPU wheel lacks
# one generated CUDA header; an empty stand-in is enough for a syntax check.
set -euo pipefail
cd "$(dirname "$0")/.."
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl"
echo '#pragma once' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
inc=$(python -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
cuda_inc=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include
g++ -std=c++20 -fsyntax-only -DHYBRID_ENGINE_CUDA -I"$shim" -I"$inc" -I"$inc/torch/csrc/api/include" \
  -I"$cuda_inc" -Ihybrid_engine/csrc/include hybrid_engine/csrc/cuda/bindings.cpp
echo "hybrid_engine/csrc/cuda/bindings.cpp: syntax OK"
