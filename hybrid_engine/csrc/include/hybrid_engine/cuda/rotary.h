// CUDA launcher for rotary_append_kv (hybrid_engine/csrc/cuda/rotary.cu). Torch-free: raw pointers, sizes and a stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// Sizes and element strides of one rotary_append_kv call (q, k, v are addressed by strides: views
// into a fused QKV projection). half = R / 2 and P = rows of the cos/sin tables (0 without rotary).
struct RotaryShape {
  int64_t B, S, Hq, Hkv, D, T_max, P, half;
  int64_t q_b, q_s, q_h, k_b, k_s, k_h, v_b, v_s, v_h;
};

// T is float, __half or __nv_bfloat16; I is int32_t or int64_t. q [B, S, Hq, D], k, v [B, S, Hkv, D]
// (last dim contiguous), k_cache, v_cache [B, Hkv, T_max, D] contiguous, positions [B, S]
// contiguous, cos, sin fp32 [P, half] contiguous or both null. Rotates q, k in place and writes
// k, v to cache slot p of every token with 0 <= p < T_max (and p < P with rotary); the host
// rejects other non-negative positions, the kernel only refuses to write for them.
template <typename T, typename I>
cudaError_t rotary_append_kv(T* q, T* k, const T* v, T* k_cache, T* v_cache, const I* positions, const float* cos,
                             const float* sin, const RotaryShape& shape, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
