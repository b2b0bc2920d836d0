// fp32 vector loads and stores from and to fp32, bf16 or fp16 memory. The CPU kernels compute in
// fp32 whatever the storage dtype, so every element is converted once on the way in and rounded
// once on the way out. With n < kWidth they touch only the first n lanes (the tail of a row) and
// partial loads fill the other lanes with zeros, so they can feed sums directly; n == kWidth takes
// the full-width instruction, so one loop serves the body and the tail of a row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) && defined(HE_HAVE_AVX512BF16)
#include <immintrin.h>
#endif

// Dispatch over the storage dtypes vec_io loads and stores: fp32, bf16 and fp16 (HE_DISPATCH_FLOATING also
// instantiates double, which it does not).
#define HE_DISPATCH_STORAGE(dtype, name, ...)                                               \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace hybrid_engine::vec_io {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = fVec::size();

inline fVec load(const float* p, int64_t n = kWidth) { return n == kWidth ? fVec::loadu(p) : fVec::loadu(p, n); }

template <typename T>
inline fVec load(const T* p, int64_t n = kWidth) {
  if (n == kWidth) {
    fVec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)));
}

inline void store(float* p, const fVec& v, int64_t n = kWidth) {
  if (n == kWidth) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

template <typename T>
inline void store(T* p, const fVec& v, int64_t n = kWidth) {
#if defined(CPU_CAPABILITY_AVX512) && defined(HE_HAVE_AVX512BF16)
  // One instruction (round to nearest even) instead of at::vec's integer emulation of the rounding.
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const auto packed = (__m256i)_mm512_cvtneps_pbh(v);  // NOLINT: a same-size vector cast
    if (n == kWidth) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), packed);
    }
    return;
  }
#endif
  at::vec::convert_from_float<T>(v, v).store(p, n);
}

}  // namespace hybrid_engine::vec_io
