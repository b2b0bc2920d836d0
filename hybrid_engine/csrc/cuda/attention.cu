// Attention on the GPU, fp32 accumulation with an online (streaming) softmax.
//
// decode: one block per (sequence, kv head, chunk of up to 8 of the group's query heads). Its warps
// take interleaved keys; every lane holds D/32 dims of the chunk's queries and accumulators, so the
// chunk's heads share each key/value row a warp loads. The warps' partial softmax states merge
// through shared memory at the end.
//
// prefill: a simple flash-attention-style kernel. A block owns 16 query rows of one head (8 threads
// per row, each holding D/8 dims), stages 16-key tiles of K and V in shared memory and sweeps the
// tiles from the sequence's first real token to the block's last query, so padding and future
// keys are never loaded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "hybrid_engine/cuda/attention.h"
#include "hybrid_engine/cuda/convert.cuh"

namespace hybrid_engine::cuda {
namespace {

// Lengths outside [0, hi] are clamped so that no kernel reads past its tensors (the host binding
// cannot check device values without synchronising).
__device__ __forceinline__ int64_t clamp_len(int64_t L, int64_t hi) { return L < 0 ? 0 : (L > hi ? hi : L); }

// ---- decode ----

constexpr int kDecodeWarps = 8;

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// GC query heads per block, NCH = dims per lane (D <= 32 * NCH); lane holds dims lane + 32 * c.
template <typename T, int GC, int NCH>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    decode_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sh, const T* __restrict__ k,
                  const T* __restrict__ v, const int64_t* __restrict__ seq_lens, T* __restrict__ out, int64_t Hq,
                  int64_t Hkv, int64_t T_max, int D, int G, int chunks, float scale) {
  const int64_t item = blockIdx.x;
  const int g0 = static_cast<int>(item % chunks) * GC;
  const int64_t kvh = item / chunks % Hkv, b = item / chunks / Hkv;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t L = clamp_len(seq_lens[b], T_max);
  T* o = out + (b * Hq + kvh * G + g0) * D;
  if (L == 0) {  // an empty sequence has a zero row
    for (int i = threadIdx.x; i < GC * D; i += blockDim.x)
      if (g0 + i / D < G) o[i] = from_float<T>(0.f);
    return;
  }
  float qr[GC][NCH], acc[GC][NCH], m[GC], l[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    const T* qh = q + b * q_sb + (kvh * G + g0 + g) * q_sh;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d = lane + 32 * c;
      qr[g][c] = (g0 + g < G && d < D) ? to_float(qh[d]) * scale : 0.f;
      acc[g][c] = 0.f;
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  const int64_t base = (b * Hkv + kvh) * T_max * D;
  for (int64_t t = warp; t < L; t += kDecodeWarps) {
    float kf[NCH], vf[NCH];
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d = lane + 32 * c;
      kf[c] = d < D ? to_float(k[base + t * D + d]) : 0.f;
      vf[c] = d < D ? to_float(v[base + t * D + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < NCH; ++c) s += qr[g][c] * kf[c];
      s = warp_sum(s);
      const float m_new = fmaxf(m[g], s);
      const float corr = __expf(m[g] - m_new), p = __expf(s - m_new);  // corr = 0 on the first key
      l[g] = l[g] * corr + p;
#pragma unroll
      for (int c = 0; c < NCH; ++c) acc[g][c] = acc[g][c] * corr + p * vf[c];
      m[g] = m_new;
    }
  }
  // Merge the warps' states one head at a time; warps that saw no key hold m = -inf, l = 0.
  __shared__ float sm_acc[kDecodeWarps][NCH * 32];
  __shared__ float sm_m[kDecodeWarps], sm_l[kDecodeWarps];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) sm_acc[warp][lane + 32 * c] = acc[g][c];
    if (lane == 0) {
      sm_m[warp] = m[g];
      sm_l[warp] = l[g];
    }
    __syncthreads();
    if (g0 + g < G) {
      float M = -INFINITY, denom = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, sm_m[w]);  // finite: warp 0 saw key 0
      for (int w = 0; w < kDecodeWarps; ++w) denom += sm_l[w] * __expf(sm_m[w] - M);
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.f;
        for (int w = 0; w < kDecodeWarps; ++w) num += sm_acc[w][d] * __expf(sm_m[w] - M);
        o[g * D + d] = from_float<T>(num / denom);
      }
    }
    __syncthreads();
  }
}

template <typename T, int GC>
void launch_decode(const T* q, int64_t q_sb, int64_t q_sh, const T* k, const T* v, const int64_t* seq_lens, T* out,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t T_max, int D, int G, float scale, cudaStream_t stream) {
  const int chunks = (G + GC - 1) / GC;
  const dim3 grid(static_cast<unsigned>(B * Hkv * chunks)), block(kDecodeWarps * 32);
  if (D <= 64) {
    decode_kernel<T, GC, 2><<<grid, block, 0, stream>>>(q, q_sb, q_sh, k, v, seq_lens, out, Hq, Hkv, T_max, D, G,
                                                          chunks, scale);
  } else if (D <= 128) {
    decode_kernel<T, GC, 4><<<grid, block, 0, stream>>>(q, q_sb, q_sh, k, v, seq_lens, out, Hq, Hkv, T_max, D, G,
                                                          chunks, scale);
  } else {
    decode_kernel<T, GC, 8><<<grid, block, 0, stream>>>(q, q_sb, q_sh, k, v, seq_lens, out, Hq, Hkv, T_max, D, G,
                                                          chunks, scale);
  }
}

template <typename T>
cudaError_t decode_typed(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                         const int64_t* seq_lens, void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t T_max,
                         int64_t D, float scale, cudaStream_t stream) {
  const auto *qp = static_cast<const T*>(q), *kp = static_cast<const T*>(k), *vp = static_cast<const T*>(v);
  T* op = static_cast<T*>(out);
  const int G = static_cast<int>(Hq / Hkv), d = static_cast<int>(D);
  // Chunks of up to 8 heads bound the registers per thread; larger groups use several blocks.
  if (G == 1) {
    launch_decode<T, 1>(qp, q_sb, q_sh, kp, vp, seq_lens, op, B, Hq, Hkv, T_max, d, G, scale, stream);
  } else if (G == 2) {
    launch_decode<T, 2>(qp, q_sb, q_sh, kp, vp, seq_lens, op, B, Hq, Hkv, T_max, d, G, scale, stream);
  } else if (G <= 4) {
    launch_decode<T, 4>(qp, q_sb, q_sh, kp, vp, seq_lens, op, B, Hq, Hkv, T_max, d, G, scale, stream);
  } else {
    launch_decode<T, 8>(qp, q_sb, q_sh, kp, vp, seq_lens, op, B, Hq, Hkv, T_max, d, G, scale, stream);
  }
  return cudaGetLastError();
}

// ---- prefill ----

constexpr int kRowsPerBlock = 16, kThreadsPerRow = 8, kKeyTile = 16;

// NPT dims per thread (D <= 8 * NPT); thread `sub` of a row holds dims sub + 8 * c.
template <typename T, int NPT>
__global__ void __launch_bounds__(kRowsPerBlock* kThreadsPerRow)
    prefill_kernel(const T* __restrict__ q, Strides3 qs, const T* __restrict__ k, Strides3 ks,
                   const T* __restrict__ v, Strides3 vs, const int64_t* __restrict__ seq_lens, T* __restrict__ out,
                   int64_t Hq, int64_t G, int64_t T_, int D, float scale) {
  constexpr int kDims = NPT * kThreadsPerRow;
  __shared__ float k_tile[kKeyTile][kDims], v_tile[kKeyTile][kDims];
  const int64_t b = blockIdx.x / Hq, h = blockIdx.x % Hq, kvh = h / G;
  const int64_t s0 = T_ - clamp_len(seq_lens[b], T_);  // first real position
  const int sub = threadIdx.x % kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const bool live = row >= s0 && row < T_;
  float qr[NPT], acc[NPT], m = -INFINITY, l = 0.f;
#pragma unroll
  for (int c = 0; c < NPT; ++c) {
    const int d = sub + kThreadsPerRow * c;
    qr[c] = (live && d < D) ? to_float(q[b * qs.b + h * qs.h + row * qs.t + d]) * scale : 0.f;
    acc[c] = 0.f;
  }
  const T* kh = k + b * ks.b + kvh * ks.h;
  const T* vh = v + b * vs.b + kvh * vs.h;
  const int64_t hi = min(T_, static_cast<int64_t>(blockIdx.y + 1) * kRowsPerBlock);  // later keys are future
  for (int64_t j0 = s0; j0 < hi; j0 += kKeyTile) {
    for (int i = threadIdx.x; i < kKeyTile * kDims; i += blockDim.x) {
      const int jj = i / kDims, d = i % kDims;
      const int64_t j = j0 + jj;
      const bool ok = j < hi && d < D;
      k_tile[jj][d] = ok ? to_float(kh[j * ks.t + d]) : 0.f;
      v_tile[jj][d] = ok ? to_float(vh[j * vs.t + d]) : 0.f;
    }
    __syncthreads();
    float s[kKeyTile], m_tile = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kKeyTile; ++jj) {
      float part = 0.f;
#pragma unroll
      for (int c = 0; c < NPT; ++c) part += qr[c] * k_tile[jj][sub + kThreadsPerRow * c];
      // Sum over the row's 8 threads (adjacent lanes).
      for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      const int64_t j = j0 + jj;
      s[jj] = (live && j <= row && j < hi) ? part : -INFINITY;
      m_tile = fmaxf(m_tile, s[jj]);
    }
    const float m_new = fmaxf(m, m_tile);
    if (m_new != -INFINITY) {  // rows that have seen no key yet (or never will: padding) skip
      const float corr = __expf(m - m_new);
      l *= corr;
#pragma unroll
      for (int c = 0; c < NPT; ++c) acc[c] *= corr;
#pragma unroll
      for (int jj = 0; jj < kKeyTile; ++jj) {
        const float p = __expf(s[jj] - m_new);
        l += p;
#pragma unroll
        for (int c = 0; c < NPT; ++c) acc[c] += p * v_tile[jj][sub + kThreadsPerRow * c];
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (row < T_) {
    const float inv = l > 0.f ? 1.f / l : 0.f;  // padded rows: l = 0 -> zeros
#pragma unroll
    for (int c = 0; c < NPT; ++c) {
      const int d = sub + kThreadsPerRow * c;
      if (d < D) out[((b * Hq + h) * T_ + row) * D + d] = from_float<T>(acc[c] * inv);
    }
  }
}

template <typename T>
cudaError_t prefill_typed(const void* q, Strides3 qs, const void* k, Strides3 ks, const void* v, Strides3 vs,
                          const int64_t* seq_lens, void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t T_,
                          int64_t D, float scale, cudaStream_t stream) {
  const auto *qp = static_cast<const T*>(q), *kp = static_cast<const T*>(k), *vp = static_cast<const T*>(v);
  T* op = static_cast<T*>(out);
  const dim3 grid(static_cast<unsigned>(B * Hq), static_cast<unsigned>((T_ + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kRowsPerBlock * kThreadsPerRow);
  const int64_t G = Hq / Hkv;
  const int d = static_cast<int>(D);
  if (D <= 64) {
    prefill_kernel<T, 8><<<grid, block, 0, stream>>>(qp, qs, kp, ks, vp, vs, seq_lens, op, Hq, G, T_, d, scale);
  } else if (D <= 128) {
    prefill_kernel<T, 16><<<grid, block, 0, stream>>>(qp, qs, kp, ks, vp, vs, seq_lens, op, Hq, G, T_, d, scale);
  } else {
    prefill_kernel<T, 32><<<grid, block, 0, stream>>>(qp, qs, kp, ks, vp, vs, seq_lens, op, Hq, G, T_, d, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t decode_attention(AttentionDtype dtype, const void* q, int64_t q_sb, int64_t q_sh, const void* k_cache,
                             const void* v_cache, const int64_t* seq_lens, void* out, int64_t B, int64_t Hq,
                             int64_t Hkv, int64_t T_max, int64_t D, float scale, cudaStream_t stream) {
  if (B == 0 || Hq == 0) return cudaSuccess;
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return decode_typed<float>(q, q_sb, q_sh, k_cache, v_cache, seq_lens, out, B, Hq, Hkv, T_max, D, scale, stream);
    case AttentionDtype::kBFloat16:
      return decode_typed<__nv_bfloat16>(q, q_sb, q_sh, k_cache, v_cache, seq_lens, out, B, Hq, Hkv, T_max, D, scale,
                                         stream);
    case AttentionDtype::kFloat16:
      return decode_typed<__half>(q, q_sb, q_sh, k_cache, v_cache, seq_lens, out, B, Hq, Hkv, T_max, D, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t prefill_attention(AttentionDtype dtype, const void* q, Strides3 qs, const void* k, Strides3 ks,
                              const void* v, Strides3 vs, const int64_t* seq_lens, void* out, int64_t B, int64_t Hq,
                              int64_t Hkv, int64_t T, int64_t D, float scale, cudaStream_t stream) {
  if (B == 0 || Hq == 0 || T == 0) return cudaSuccess;
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return prefill_typed<float>(q, qs, k, ks, v, vs, seq_lens, out, B, Hq, Hkv, T, D, scale, stream);
    case AttentionDtype::kBFloat16:
      return prefill_typed<__nv_bfloat16>(q, qs, k, ks, v, vs, seq_lens, out, B, Hq, Hkv, T, D, scale, stream);
    case AttentionDtype::kFloat16:
      return prefill_typed<__half>(q, qs, k, ks, v, vs, seq_lens, out, B, Hq, Hkv, T, D, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hybrid_engine::cuda
