// CUDA launchers for decode_attention and prefill_attention (hybrid_engine/csrc/cuda/attention.cu). Torch-free:
// raw pointers, sizes, strides in elements and a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// The element type of q, k, v and out (one dtype for all four); accumulation is always fp32.
enum class AttentionDtype { kFloat32, kBFloat16, kFloat16 };

// q [B, Hq, D] (batch/head strides q_sb, q_sh; last dim contiguous), k_cache/v_cache
// [B, Hkv, T_max, D] contiguous, seq_lens int64 [B] -> out [B, Hq, D] contiguous. Sequence b
// attends to cache positions [0, seq_lens[b]) (clamped to [0, T_max]: the kernel never reads past
// the cache); an empty sequence gives a zero row. Hq is a multiple of Hkv; D <= 256.
cudaError_t decode_attention(AttentionDtype dtype, const void* q, int64_t q_sb, int64_t q_sh, const void* k_cache,
                             const void* v_cache, const int64_t* seq_lens, void* out, int64_t B, int64_t Hq,
                             int64_t Hkv, int64_t T_max, int64_t D, float scale, cudaStream_t stream);

// Strides (in elements) of dims 0..2 of a [B, H, T, D] tensor whose last dim is contiguous.
struct Strides3 {
  int64_t b, h, t;
};

// q [B, Hq, T, D], k/v [B, Hkv, T, D], seq_lens int64 [B] -> out [B, Hq, T, D] contiguous. Left
// padding: sequence b holds positions [T - seq_lens[b], T) (clamped as above); query t attends to
// keys [T - seq_lens[b], t]; padded query rows are zero. Hq is a multiple of Hkv; D <= 256.
cudaError_t prefill_attention(AttentionDtype dtype, const void* q, Strides3 qs, const void* k, Strides3 ks,
                              const void* v, Strides3 vs, const int64_t* seq_lens, void* out, int64_t B, int64_t Hq,
                              int64_t Hkv, int64_t T, int64_t D, float scale, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
