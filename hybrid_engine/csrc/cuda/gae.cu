// Generalised advantage estimation on the GPU: one thread scans one sequence backwards. The scan is
// serial in T and tiny next to the model's forward pass, so a thread per sequence is enough.
#include "hybrid_engine/cuda/gae.h"

namespace hybrid_engine::cuda {
namespace {

__global__ void gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values,
                           const float* __restrict__ mask, float* __restrict__ adv, float* __restrict__ ret,
                           int64_t B, int64_t T, float gamma, float lam) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  float next_value = 0.f, last_gae = 0.f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float m = mask[o + t];
    const float v = values[o + t];
    if (m == 0.f) {
      adv[o + t] = 0.f;
      ret[o + t] = 0.f;
      next_value = 0.f;
      last_gae = 0.f;
      continue;
    }
    const float delta = rewards[o + t] + gamma * next_value - v;
    last_gae = delta + gamma * lam * last_gae;
    adv[o + t] = last_gae;
    ret[o + t] = last_gae + v;
    next_value = v;
  }
}

}  // namespace

cudaError_t gae(const float* rewards, const float* values, const float* mask, float* advantages, float* returns,
                int64_t B, int64_t T, float gamma, float lam, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  const int threads = 128;
  const int blocks = static_cast<int>((B + threads - 1) / threads);
  gae_kernel<<<blocks, threads, 0, stream>>>(rewards, values, mask, advantages, returns, B, T, gamma, lam);
  return cudaGetLastError();
}

}  // namespace hybrid_engine::cuda
