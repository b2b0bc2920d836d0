// Rotary position embedding fused with the KV-cache append on the GPU: one block per token. The
// block's threads first rotate the (head, pair) elements of q and k, writing rotated k straight
// to the cache, then copy the rest of k and all of v into the token's cache slot. Consecutive
// threads take consecutive elements of a head, so every load and store is coalesced.
#include "hybrid_engine/cuda/rotary.h"
#include "hybrid_engine/cuda/convert.cuh"

namespace hybrid_engine::cuda {
namespace {

template <typename T, typename I>
__global__ void rotary_append_kv_kernel(T* __restrict__ q, T* __restrict__ k, const T* __restrict__ v,
                                        T* __restrict__ k_cache, T* __restrict__ v_cache,
                                        const I* __restrict__ positions, const float* __restrict__ cos,
                                        const float* __restrict__ sin, const RotaryShape s) {
  const int64_t t = blockIdx.x;
  const int64_t p = static_cast<int64_t>(positions[t]);
  if (p < 0 || p >= s.T_max || (cos != nullptr && p >= s.P)) return;  // pads, and never out of bounds
  const int64_t b = t / s.S, si = t % s.S;
  T* q_row = q + b * s.q_b + si * s.q_s;
  T* k_row = k + b * s.k_b + si * s.k_s;
  const T* v_row = v + b * s.v_b + si * s.v_s;
  // Element (h, d) of this token's cache slot: k_cache[b, h, p, d].
  const auto slot = [&](int64_t h) { return ((b * s.Hkv + h) * s.T_max + p) * s.D; };
  int64_t rot = 0;
  if (cos != nullptr) {
    rot = 2 * s.half;
    const float* c = cos + p * s.half;
    const float* sn = sin + p * s.half;
    for (int64_t idx = threadIdx.x; idx < (s.Hq + s.Hkv) * s.half; idx += blockDim.x) {
      const int64_t h = idx / s.half, i = idx % s.half;
      const bool is_k = h >= s.Hq;
      T* x = is_k ? k_row + (h - s.Hq) * s.k_h : q_row + h * s.q_h;
      const float x1 = to_float(x[i]), x2 = to_float(x[i + s.half]);
      const T o1 = from_float<T>(x1 * c[i] - x2 * sn[i]);
      const T o2 = from_float<T>(x2 * c[i] + x1 * sn[i]);
      x[i] = o1;
      x[i + s.half] = o2;
      if (is_k) {
        T* cache = k_cache + slot(h - s.Hq);
        cache[i] = o1;
        cache[i + s.half] = o2;
      }
    }
  }
  // Dims [rot, D) of k are untouched by the loop above, so reading them here cannot race with it.
  for (int64_t idx = threadIdx.x; idx < s.Hkv * s.D; idx += blockDim.x) {
    const int64_t h = idx / s.D, d = idx % s.D;
    if (d >= rot) k_cache[slot(h) + d] = k_row[h * s.k_h + d];
    v_cache[slot(h) + d] = v_row[h * s.v_h + d];
  }
}

}  // namespace

template <typename T, typename I>
cudaError_t rotary_append_kv(T* q, T* k, const T* v, T* k_cache, T* v_cache, const I* positions, const float* cos,
                             const float* sin, const RotaryShape& shape, cudaStream_t stream) {
  const int64_t tokens = shape.B * shape.S;
  if (tokens == 0 || shape.D == 0) return cudaSuccess;
  rotary_append_kv_kernel<T, I><<<static_cast<unsigned>(tokens), 128, 0, stream>>>(q, k, v, k_cache, v_cache,
                                                                                   positions, cos, sin, shape);
  return cudaGetLastError();
}

#define HE_INSTANTIATE_ROTARY(T, I)                                                                        \
  template cudaError_t rotary_append_kv<T, I>(T*, T*, const T*, T*, T*, const I*, const float*, const float*, \
                                              const RotaryShape&, cudaStream_t);
HE_INSTANTIATE_ROTARY(float, int32_t)
HE_INSTANTIATE_ROTARY(float, int64_t)
HE_INSTANTIATE_ROTARY(__half, int32_t)
HE_INSTANTIATE_ROTARY(__half, int64_t)
HE_INSTANTIATE_ROTARY(__nv_bfloat16, int32_t)
HE_INSTANTIATE_ROTARY(__nv_bfloat16, int64_t)
#undef HE_INSTANTIATE_ROTARY

}  // namespace hybrid_engine::cuda
