// CUDA launcher for moe_experts' grouped GEMM (hybrid_engine/csrc/cuda/moe.cu). Torch-free: raw pointers, sizes and
// a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hybrid_engine/cuda/linear.h"

namespace hybrid_engine::cuda {

// x fp32 [A, K] with its rows sorted by expert, offsets int64 [E + 1] (expert e's rows: [offsets[e], offsets[e+1])),
// w [E, N, K] in `dtype`, all contiguous -> out fp32 [A, N]: row a of expert e is x[a] @ w[e].T.
cudaError_t grouped_linear(const float* x, const int64_t* offsets, const void* w, WeightDtype dtype, float* out,
                           int64_t E, int64_t A, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
