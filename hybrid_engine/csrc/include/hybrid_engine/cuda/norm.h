// CUDA launchers for rms_norm (hybrid_engine/csrc/cuda/norm.cu). Torch-free: raw pointers, sizes and a stream.
// T is x's element type (float, __half or __nv_bfloat16); W the weight's (float or T). Everything is
// computed in fp32 and rounded once to the output's type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// x [N, H] contiguous, weight [H] -> out [N, H], rstd fp32 [N]. With residual [N, H] (else null),
// new_residual [N, H] = x + residual rounded to T, and out is the norm of new_residual.
template <typename T, typename W>
cudaError_t rms_norm_forward(const T* x, const T* residual, const W* weight, T* out, T* new_residual, float* rstd,
                             int64_t N, int64_t H, float eps, cudaStream_t stream);

// How many blocks the backward spreads N rows over: the row count of its fp32 workspace.
int rms_norm_backward_blocks(int64_t N);

// grad_out, x [N, H] contiguous, rstd fp32 [N] -> grad_x [N, H], grad_weight [H] (W). workspace is
// fp32 [rms_norm_backward_blocks(N), H] scratch for the per-block grad_weight partial sums.
template <typename T, typename W>
cudaError_t rms_norm_backward(const T* grad_out, const T* x, const W* weight, const float* rstd, T* grad_x,
                              W* grad_weight, float* workspace, int64_t N, int64_t H, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
