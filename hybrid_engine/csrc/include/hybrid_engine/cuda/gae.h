// CUDA launcher for gae (hybrid_engine/csrc/cuda/gae.cu). Torch-free: raw pointers, sizes and a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// rewards, values, mask fp32 [B, T] contiguous -> advantages, returns fp32 [B, T].
cudaError_t gae(const float* rewards, const float* values, const float* mask, float* advantages, float* returns,
                int64_t B, int64_t T, float gamma, float lam, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
