// decode_linear on the GPU: out[M, N] = x[M, K] @ weight[N, K]^T + bias for the few activation rows of a
// generation step. The weight is the only large operand, so the kernel is a batched matrix-vector product:
// each warp owns kRows weight rows and streams them along K once with 16-byte loads, against a tile of up to
// MT activation rows held in registers as fp32 accumulators (bf16/fp16 weights are widened in registers);
// x is small and read through L1, where the block's warps share it. More than MT rows: more tiles (grid.y).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hybrid_engine/cuda/linear.h"

namespace hybrid_engine::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kRows = 2;   // weight rows per warp

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

// V consecutive weights (16 bytes) widened to fp32.
template <typename W, int V>
__device__ __forceinline__ void load_weights(const W* p, float (&out)[V]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const W* v = reinterpret_cast<const W*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = widen(v[j]);
}

template <int V>
__device__ __forceinline__ void load_x(const float* p, float (&out)[V]) {
#pragma unroll
  for (int j = 0; j < V; j += 4) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(p + j));
    out[j] = f.x;
    out[j + 1] = f.y;
    out[j + 2] = f.z;
    out[j + 3] = f.w;
  }
}

// kVector: K is a multiple of V and the rows are 16-byte aligned, so every load is a 16-byte one.
template <typename W, int MT, bool kVector>
__global__ void __launch_bounds__(kWarps * 32)
    decode_linear_kernel(const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ bias,
                         float* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  constexpr int V = 16 / sizeof(W);
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * kRows;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  if (n0 >= N) return;
  const int rows = static_cast<int>(N - n0 < kRows ? N - n0 : kRows);
  const int cols = static_cast<int>(M - m0 < MT ? M - m0 : MT);
  float acc[kRows][MT] = {};
  if constexpr (kVector) {
    for (int64_t k = static_cast<int64_t>(lane) * V; k < K; k += 32 * V) {
      float wv[kRows][V];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          load_weights<W, V>(w + (n0 + r) * K + k, wv[r]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) wv[r][j] = 0.f;
        }
      }
#pragma unroll
      for (int c = 0; c < MT; ++c) {
        if (c < cols) {
          float xv[V];
          load_x<V>(x + (m0 + c) * K + k, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int j = 0; j < V; ++j) acc[r][c] = fmaf(wv[r][j], xv[j], acc[r][c]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float wk = r < rows ? widen(w[(n0 + r) * K + k]) : 0.f;
#pragma unroll
        for (int c = 0; c < MT; ++c)
          if (c < cols) acc[r][c] = fmaf(wk, x[(m0 + c) * K + k], acc[r][c]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < MT; ++c) {
      float v = acc[r][c];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      // Spread the stores over the lanes instead of serialising them on lane 0.
      if (lane == (r * MT + c) % 32 && r < rows && c < cols) {
        out[(m0 + c) * N + n0 + r] = v + (bias ? bias[n0 + r] : 0.f);
      }
    }
  }
}

template <typename W, int MT>
cudaError_t launch(const float* x, const W* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K,
                   cudaStream_t stream) {
  constexpr int V = 16 / sizeof(W);
  const dim3 grid(static_cast<unsigned>((N + kWarps * kRows - 1) / (kWarps * kRows)),
                  static_cast<unsigned>((M + MT - 1) / MT));
  const bool aligned =
      K % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if (aligned) {
    decode_linear_kernel<W, MT, true><<<grid, kWarps * 32, 0, stream>>>(x, w, bias, out, M, N, K);
  } else {
    decode_linear_kernel<W, MT, false><<<grid, kWarps * 32, 0, stream>>>(x, w, bias, out, M, N, K);
  }
  return cudaGetLastError();
}

template <typename W>
cudaError_t dispatch_tile(const float* x, const W* w, const float* bias, float* out, int64_t M, int64_t N,
                          int64_t K, cudaStream_t stream) {
  // The smallest tile that holds M: no accumulators are spent on rows that do not exist.
  if (M <= 1) return launch<W, 1>(x, w, bias, out, M, N, K, stream);
  if (M <= 2) return launch<W, 2>(x, w, bias, out, M, N, K, stream);
  if (M <= 4) return launch<W, 4>(x, w, bias, out, M, N, K, stream);
  return launch<W, 8>(x, w, bias, out, M, N, K, stream);
}

}  // namespace

cudaError_t decode_linear(const float* x, const void* weight, WeightDtype dtype, const float* bias, float* out,
                          int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case WeightDtype::kFloat32:
      return dispatch_tile(x, static_cast<const float*>(weight), bias, out, M, N, K, stream);
    case WeightDtype::kBFloat16:
      return dispatch_tile(x, static_cast<const __nv_bfloat16*>(weight), bias, out, M, N, K, stream);
    case WeightDtype::kFloat16:
      return dispatch_tile(x, static_cast<const __half*>(weight), bias, out, M, N, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hybrid_engine::cuda
