// RMSNorm on the GPU. Forward: one block per row, 16-byte vector loads where the row allows, a
// block-wide sum of squares, then a second pass that the block's threads read back from L1/L2.
// Backward: a grid of a few blocks per SM, each walking rows and keeping its own fp32 row of
// grad_weight partial sums (no atomics); a second kernel adds the partials column by column.
#include <algorithm>
#include <initializer_list>

#include "hybrid_engine/cuda/norm.h"
#include "hybrid_engine/cuda/convert.cuh"

namespace hybrid_engine::cuda {
namespace {

// VEC elements moved as one aligned load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The sum of v over the block, returned to every thread. Safe to call repeatedly (the trailing
// barrier keeps the next call from overwriting partials still being read).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

template <typename T, typename W, int VEC>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ weight,
                               T* __restrict__ out, T* __restrict__ new_residual, float* __restrict__ rstd, int64_t H,
                               float eps) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x, nvec = H / VEC;
  const P* xr = reinterpret_cast<const P*>(x + row * H);
  P* nr = residual != nullptr ? reinterpret_cast<P*>(new_residual + row * H) : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    P a = xr[i];
    if (residual != nullptr) {
      // The norm is taken of the sum as stored (rounded to T), like HF's decoder layer.
      const P b = reinterpret_cast<const P*>(residual + row * H)[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) a.v[k] = from_float<T>(to_float(a.v[k]) + to_float(b.v[k]));
      nr[i] = a;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) ss += to_float(a.v[k]) * to_float(a.v[k]);
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  // Each thread reads back only the elements it wrote itself, so no barrier is needed.
  const P* src = residual != nullptr ? nr : xr;
  P* o = reinterpret_cast<P*>(out + row * H);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P a = src[i];
    const Pack<W, VEC> w = reinterpret_cast<const Pack<W, VEC>*>(weight)[i];
    P y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) y.v[k] = from_float<T>(to_float(a.v[k]) * r * to_float(w.v[k]));
    o[i] = y;
  }
}

// grad_x = rstd * g * w - (rstd^3 * sum(g * w * x) / H) * x; partial row += g * x * rstd.
template <typename T, typename W, int VEC>
__global__ void backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const W* __restrict__ weight,
                                const float* __restrict__ rstd, T* __restrict__ grad_x, float* __restrict__ workspace,
                                int64_t N, int64_t H) {
  using P = Pack<T, VEC>;
  using PW = Pack<W, VEC>;
  const int64_t nvec = H / VEC;
  float* partial = workspace + blockIdx.x * H;
  const PW* w = reinterpret_cast<const PW*>(weight);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const P* g = reinterpret_cast<const P*>(grad_out + row * H);
    const P* xr = reinterpret_cast<const P*>(x + row * H);
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const P gv = g[i], xv = xr[i];
      const PW wv = w[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_float(gv.v[k]) * to_float(wv.v[k]) * to_float(xv.v[k]);
    }
    const float r = rstd[row];
    const float b = r * r * r * block_sum(dot) / static_cast<float>(H);
    const bool first = row == blockIdx.x;  // the block's first row initialises its partial row
    P* gx = reinterpret_cast<P*>(grad_x + row * H);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const P gv = g[i], xv = xr[i];
      const PW wv = w[i];
      P out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float gk = to_float(gv.v[k]), xk = to_float(xv.v[k]);
        out.v[k] = from_float<T>(r * gk * to_float(wv.v[k]) - b * xk);
        float& acc = partial[i * VEC + k];
        acc = (first ? 0.f : acc) + gk * xk * r;
      }
      gx[i] = out;
    }
  }
}

template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ workspace, W* __restrict__ grad_weight, int blocks,
                                  int64_t H) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += workspace[b * H + j];
  grad_weight[j] = from_float<W>(s);
}

bool aligned(const void* p, int64_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16-byte vectors when H and every row start allow them, else one element at a time.
template <typename T, typename W>
bool can_vectorize(int64_t H, std::initializer_list<const void*> rows, const W* weight) {
  constexpr int VEC = 16 / sizeof(T);
  if (H % VEC != 0 || !aligned(weight, sizeof(W) * VEC)) return false;
  return std::all_of(rows.begin(), rows.end(), [](const void* p) { return aligned(p, 16); });
}

// Threads per row: enough for the row's vectors, at most 512.
int threads_for(int64_t nvec) { return static_cast<int>(std::clamp<int64_t>((nvec + 31) / 32 * 32, 32, 512)); }

}  // namespace

template <typename T, typename W>
cudaError_t rms_norm_forward(const T* x, const T* residual, const W* weight, T* out, T* new_residual, float* rstd,
                             int64_t N, int64_t H, float eps, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(T);
  const auto rows = static_cast<unsigned>(N);
  if (can_vectorize<T>(H, {x, residual, out, new_residual}, weight)) {
    forward_kernel<T, W, VEC>
        <<<rows, threads_for(H / VEC), 0, stream>>>(x, residual, weight, out, new_residual, rstd, H, eps);
  } else {
    forward_kernel<T, W, 1><<<rows, threads_for(H), 0, stream>>>(x, residual, weight, out, new_residual, rstd, H, eps);
  }
  return cudaGetLastError();
}

int rms_norm_backward_blocks(int64_t N) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(N, 2 * sms)));
}

template <typename T, typename W>
cudaError_t rms_norm_backward(const T* grad_out, const T* x, const W* weight, const float* rstd, T* grad_x,
                              W* grad_weight, float* workspace, int64_t N, int64_t H, cudaStream_t stream) {
  const int blocks = rms_norm_backward_blocks(N);
  if (N == 0) {
    cudaMemsetAsync(grad_weight, 0, H * sizeof(W), stream);
    return cudaGetLastError();
  }
  constexpr int VEC = 16 / sizeof(T);
  if (can_vectorize<T>(H, {grad_out, x, grad_x}, weight)) {
    backward_kernel<T, W, VEC><<<blocks, threads_for(H / VEC), 0, stream>>>(grad_out, x, weight, rstd, grad_x,
                                                                             workspace, N, H);
  } else {
    backward_kernel<T, W, 1><<<blocks, threads_for(H), 0, stream>>>(grad_out, x, weight, rstd, grad_x, workspace, N, H);
  }
  const int threads = 256;
  const auto column_blocks = static_cast<unsigned>((H + threads - 1) / threads);
  column_sum_kernel<W><<<column_blocks, threads, 0, stream>>>(workspace, grad_weight, blocks, H);
  return cudaGetLastError();
}

#define HE_INSTANTIATE_NORM(T, W)                                                                              \
  template cudaError_t rms_norm_forward<T, W>(const T*, const T*, const W*, T*, T*, float*, int64_t, int64_t, \
                                              float, cudaStream_t);                                            \
  template cudaError_t rms_norm_backward<T, W>(const T*, const T*, const W*, const float*, T*, W*, float*,     \
                                               int64_t, int64_t, cudaStream_t);
HE_INSTANTIATE_NORM(float, float)
HE_INSTANTIATE_NORM(__half, __half)
HE_INSTANTIATE_NORM(__half, float)
HE_INSTANTIATE_NORM(__nv_bfloat16, __nv_bfloat16)
HE_INSTANTIATE_NORM(__nv_bfloat16, float)
#undef HE_INSTANTIATE_NORM

}  // namespace hybrid_engine::cuda
