// CUDA launcher for decode_linear (hybrid_engine/csrc/cuda/linear.cu). Torch-free: raw pointers, sizes and a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

enum class WeightDtype { kFloat32, kBFloat16, kFloat16 };

// x fp32 [M, K], weight [N, K] in `dtype`, bias fp32 [N] or nullptr, all contiguous -> out fp32 [M, N].
cudaError_t decode_linear(const float* x, const void* weight, WeightDtype dtype, const float* bias, float* out,
                          int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
