// moe_experts' grouped GEMM on the GPU: rows sorted by expert, one warp per (expert, output feature) walks that
// feature's weight row along K once per tile of kRows of the expert's rows (the row stays in L1/L2 between tiles),
// so each selected expert's weights are streamed from memory once for all its tokens and an expert without rows is
// never read. fp32 products and sums; a bf16/fp16 weight is widened on load.
#include "hybrid_engine/cuda/convert.cuh"
#include "hybrid_engine/cuda/moe.h"

namespace hybrid_engine::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block: output features per block
constexpr int kRows = 8;   // rows one warp accumulates at a time

template <typename W>
__global__ void grouped_linear_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets,
                                      const W* __restrict__ w, float* __restrict__ out, int64_t N, int64_t K) {
  const int64_t e = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int64_t start = offsets[e], end = offsets[e + 1];
  const W* row = w + (e * N + n) * K;
  for (int64_t r0 = start; r0 < end; r0 += kRows) {
    float acc[kRows] = {};
    const int64_t rows = end - r0 < kRows ? end - r0 : kRows;
    for (int64_t k = lane; k < K; k += 32) {
      const float wk = to_float(row[k]);
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) acc[r] += wk * x[(r0 + r) * K + k];
      }
    }
    for (int r = 0; r < kRows; ++r) {
      float v = acc[r];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && r < rows) out[(r0 + r) * N + n] = v;
    }
  }
}

template <typename W>
cudaError_t launch(const float* x, const int64_t* offsets, const void* w, float* out, int64_t E, int64_t N,
                   int64_t K, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(E), static_cast<unsigned>((N + kWarps - 1) / kWarps));
  grouped_linear_kernel<W><<<grid, kWarps * 32, 0, stream>>>(x, offsets, static_cast<const W*>(w), out, N, K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t grouped_linear(const float* x, const int64_t* offsets, const void* w, WeightDtype dtype, float* out,
                           int64_t E, int64_t A, int64_t N, int64_t K, cudaStream_t stream) {
  if (A == 0 || N == 0 || E == 0) return cudaSuccess;
  switch (dtype) {
    case WeightDtype::kBFloat16: return launch<__nv_bfloat16>(x, offsets, w, out, E, N, K, stream);
    case WeightDtype::kFloat16: return launch<__half>(x, offsets, w, out, E, N, K, stream);
    default: return launch<float>(x, offsets, w, out, E, N, K, stream);
  }
}

}  // namespace hybrid_engine::cuda
