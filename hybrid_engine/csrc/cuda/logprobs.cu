// token_logprobs on the GPU, after the GEMM: the caller computes a block of logits with cuBLAS and
// these kernels reduce it. The forward kernel reads each row once (an online max / sum-exp /
// sum-exp-times-logit per thread, merged across the block); the gradient kernel is elementwise.
#include <cfloat>

#include "hybrid_engine/cuda/logprobs.h"
#include "hybrid_engine/cuda/convert.cuh"

namespace hybrid_engine::cuda {
namespace {

constexpr int64_t kIgnoreIndex = -100;
constexpr int kRowThreads = 256;
constexpr int kGradThreads = 256;
constexpr int kGradColsPerThread = 4;

// Running softmax statistics of a set of scaled logits z: m = max z, s = sum e^(z-m),
// t = sum e^(z-m) (z-m). Centring on the max keeps every term <= 1 and lets the entropy,
// log(s) - t / s, come out without cancellation.
struct Stats {
  float m, s, t;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  if (a.s == 0.f) return b;  // empty sets have m = -inf, where the rescaling below would give NaN
  if (b.s == 0.f) return a;
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m, db = b.m - m;
  const float ea = __expf(da), eb = __expf(db);
  return {m, a.s * ea + b.s * eb, ea * (a.t + da * a.s) + eb * (b.t + db * b.s)};
}

__device__ __forceinline__ Stats block_reduce(Stats v) {
  __shared__ Stats warp_stats[kRowThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                  __shfl_xor_sync(0xffffffffu, v.t, offset)};
    v = merge(v, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kRowThreads / 32 ? warp_stats[lane] : Stats{-FLT_MAX, 0.f, 0.f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Stats o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                    __shfl_xor_sync(0xffffffffu, v.t, offset)};
      v = merge(v, o);
    }
  }
  return v;  // valid in thread 0
}

// One block per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(const T* __restrict__ logits, const int64_t* __restrict__ tokens, float* __restrict__ logprobs,
                float* __restrict__ entropy, float* __restrict__ lse, int64_t V, float inv_t, bool with_entropy) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  Stats st{-FLT_MAX, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
    const float z = to_float(x[j]) * inv_t;
    if (z > st.m) {
      // New maximum: rescale the sums to it; the new element itself adds e^0 = 1 and 0 to t.
      const float d = st.m - z, e = __expf(d);
      st.t = st.s > 0.f ? e * (st.t + d * st.s) : 0.f;
      st.s = st.s * e + 1.f;
      st.m = z;
    } else {
      const float u = z - st.m, e = __expf(u);
      st.s += e;
      st.t += e * u;
    }
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const float log_s = __logf(st.s), row_lse = st.m + log_s;
    const int64_t tok = tokens[row];
    lse[row] = row_lse;
    // Relative to the max first, so that a certain outcome gets exactly 0.
    logprobs[row] = tok == kIgnoreIndex ? 0.f : (to_float(x[tok]) * inv_t - st.m) - log_s;
    entropy[row] = with_entropy ? log_s - st.t / st.s : 0.f;
  }
}

// grid (rows, column tiles). With z = x / T, p = exp(z - lse), c = lse - H:
// dx_j = (g_lp ([j == tok] - p_j) - g_ent p_j (z_j - c)) / T = p_j (a + b (z_j - c)) + [j == tok] g_lp / T.
template <typename T>
__global__ void __launch_bounds__(kGradThreads)
    grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ tokens, const float* __restrict__ grad_logprobs,
                const float* __restrict__ grad_entropy, const float* __restrict__ lse,
                const float* __restrict__ entropy, int64_t cols, int64_t v0, float inv_t) {
  const int64_t row = blockIdx.x;
  const int64_t tok = tokens[row];
  const float g_lp = tok == kIgnoreIndex ? 0.f : grad_logprobs[row];
  const float g_ent = grad_entropy ? grad_entropy[row] : 0.f;
  const float row_lse = lse[row];
  const float c = row_lse - entropy[row], a = -inv_t * g_lp, b = -inv_t * g_ent;
  T* x = logits + row * cols;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kGradThreads * kGradColsPerThread;
  const int64_t end = min(cols, begin + kGradThreads * kGradColsPerThread);
  for (int64_t j = begin + threadIdx.x; j < end; j += kGradThreads) {
    // z - lse and z - c as single FMAs: small differences of logit-sized numbers, rounded once.
    const float xj = to_float(x[j]);
    float d = __expf(fmaf(xj, inv_t, -row_lse)) * (a + b * fmaf(xj, inv_t, -c));
    if (v0 + j == tok) d += inv_t * g_lp;
    x[j] = from_float<T>(d);
  }
}

template <typename T>
cudaError_t launch_rows(const T* logits, const int64_t* tokens, float* logprobs, float* entropy, float* lse,
                        int64_t rows, int64_t V, float inv_t, bool with_entropy, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rows_kernel<T><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(logits, tokens, logprobs, entropy, lse, V,
                                                                           inv_t, with_entropy);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad(T* logits, const int64_t* tokens, const float* grad_logprobs, const float* grad_entropy,
                        const float* lse, const float* entropy, int64_t rows, int64_t cols, int64_t v0, float inv_t,
                        cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t tiles = (cols + kGradThreads * kGradColsPerThread - 1) / (kGradThreads * kGradColsPerThread);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
  grad_kernel<T><<<grid, kGradThreads, 0, stream>>>(logits, tokens, grad_logprobs, grad_entropy, lse, entropy, cols,
                                                    v0, inv_t);
  return cudaGetLastError();
}

}  // namespace

cudaError_t token_logprobs_rows(const float* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream) {
  return launch_rows(logits, tokens, logprobs, entropy, lse, rows, V, inv_t, with_entropy, stream);
}
cudaError_t token_logprobs_rows(const __nv_bfloat16* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream) {
  return launch_rows(logits, tokens, logprobs, entropy, lse, rows, V, inv_t, with_entropy, stream);
}
cudaError_t token_logprobs_rows(const __half* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream) {
  return launch_rows(logits, tokens, logprobs, entropy, lse, rows, V, inv_t, with_entropy, stream);
}

cudaError_t token_logprobs_grad_logits(float* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream) {
  return launch_grad(logits, tokens, grad_logprobs, grad_entropy, lse, entropy, rows, cols, v0, inv_t, stream);
}
cudaError_t token_logprobs_grad_logits(__nv_bfloat16* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream) {
  return launch_grad(logits, tokens, grad_logprobs, grad_entropy, lse, entropy, rows, cols, v0, inv_t, stream);
}
cudaError_t token_logprobs_grad_logits(__half* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream) {
  return launch_grad(logits, tokens, grad_logprobs, grad_entropy, lse, entropy, rows, cols, v0, inv_t, stream);
}

}  // namespace hybrid_engine::cuda
