// The element type of a KV cache. A cache holds q's dtype, or, under fp32 activations, bf16 or fp16
// (half the bytes that decode attention streams at long contexts; kv_dtype in generation). The CPU
// kernels read and write it through fp32 (vec_io, load_to_float), so one template serves each pair.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "hybrid_engine/checks.h"

namespace hybrid_engine {

// A cache dtype is q's own, or bf16/fp16 when q is fp32.
#define CHECK_CACHE_DTYPE(cache, q)                                                                            \
  HE_CHECK((cache).scalar_type() == (q).scalar_type() ||                                                       \
               ((q).scalar_type() == at::kFloat &&                                                             \
                ((cache).scalar_type() == at::kBFloat16 || (cache).scalar_type() == at::kHalf)),              \
           #cache " must have " #q "'s dtype, or bfloat16/float16 under float32 " #q "; got ",                \
           (cache).scalar_type(), " and ", (q).scalar_type())

// Calls f(C{}) with C the cache's element type, for q's element type T (CHECK_CACHE_DTYPE has held).
template <typename T, typename F>
void dispatch_cache_type(at::ScalarType cache, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (cache == at::kBFloat16) return f(c10::BFloat16{});
    if (cache == at::kHalf) return f(c10::Half{});
  }
  f(T{});
}

}  // namespace hybrid_engine
