// Rotary position embedding fused with the KV-cache append, on the CPU. One pass per token: q and k
// are rotated in place (Hugging Face rotate_half convention, fp32 math, one rounding) and k, v are
// copied into the cache slot of the token's position. Tokens are independent and run in parallel.
#include <ATen/Parallel.h>

#include <cstring>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cpu/kv_types.h"
#include "hybrid_engine/cpu/vec_io.h"
#include "hybrid_engine/ops.h"

#define HE_OP "rotary_append_kv"

namespace hybrid_engine {
namespace {

using vec_io::fVec;
using vec_io::kWidth;

// Raw pointers, sizes and element strides of one call; q, k, v rows are addressed by strides so
// that views into a fused QKV projection need no copy. The caches hold C (T, or bf16/fp16 under fp32).
template <typename T, typename C, typename I>
struct Args {
  T *q, *k;
  C *k_cache, *v_cache;
  const T* v;
  const I* positions;      // [B, S] contiguous
  const float *cos, *sin;  // [P, half] contiguous, or null
  int64_t S, Hq, Hkv, D, T_max, half;
  int64_t q_b, q_s, q_h, k_b, k_s, k_h, v_b, v_s, v_h;
};

// (x1, x2) = (x[:half], x[half:2 half]) <- (x1 * c - x2 * s, x2 * c + x1 * s), which is HF's
// x * cat(c, c) + rotate_half(x) * cat(s, s) over the first R = 2 half dims.
template <typename T>
void rotate_head(T* x, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; i += kWidth) {
    const int64_t n = std::min(kWidth, half - i);
    const fVec x1 = vec_io::load(x + i, n), x2 = vec_io::load(x + half + i, n);
    const fVec cv = vec_io::load(c + i, n), sv = vec_io::load(s + i, n);
    vec_io::store(x + i, x1 * cv - x2 * sv, n);
    vec_io::store(x + half + i, x2 * cv + x1 * sv, n);
  }
}

// dst[0, D) = src[0, D), rounded once to the cache's type where it is narrower.
template <typename C, typename T>
void copy_row(C* dst, const T* src, int64_t D) {
  if constexpr (std::is_same_v<C, T>) {
    std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(T));
  } else {
    for (int64_t i = 0; i < D; i += kWidth) {
      const int64_t n = std::min(kWidth, D - i);
      vec_io::store(dst + i, vec_io::load(src + i, n), n);
    }
  }
}

template <typename T, typename C, typename I>
void process_tokens(const Args<T, C, I>& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p = static_cast<int64_t>(a.positions[t]);
    if (p < 0) continue;  // left padding: neither rotated nor cached
    const int64_t b = t / a.S, s = t % a.S;
    T* q = a.q + b * a.q_b + s * a.q_s;
    T* k = a.k + b * a.k_b + s * a.k_s;
    const T* v = a.v + b * a.v_b + s * a.v_s;
    if (a.cos != nullptr) {
      const float *c = a.cos + p * a.half, *sn = a.sin + p * a.half;
      for (int64_t h = 0; h < a.Hq; ++h) rotate_head(q + h * a.q_h, c, sn, a.half);
      for (int64_t h = 0; h < a.Hkv; ++h) rotate_head(k + h * a.k_h, c, sn, a.half);
    }
    // The rotated k row is still in L1: copying it whole also carries the dims past the rotary ones.
    for (int64_t h = 0; h < a.Hkv; ++h) {
      const int64_t slot = ((b * a.Hkv + h) * a.T_max + p) * a.D;
      copy_row(a.k_cache + slot, k + h * a.k_h, a.D);
      copy_row(a.v_cache + slot, v + h * a.v_h, a.D);
    }
  }
}

// Checked before anything is written, so a bad position leaves every tensor as it was.
template <typename I>
void check_positions(const I* positions, int64_t B, int64_t S, int64_t T_max, int64_t P) {
  for (int64_t t = 0; t < B * S; ++t) {
    const int64_t p = static_cast<int64_t>(positions[t]);
    HE_CHECK(p < T_max, "positions[", t / S, ", ", t % S, "] = ", p, " is past the cache: k_cache has T_max = ", T_max,
             " slots");
    HE_CHECK(P < 0 || p < P, "positions[", t / S, ", ", t % S, "] = ", p, " is past the rotary tables: cos has ", P,
             " rows");
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                const at::Tensor& v_cache, const at::Tensor& positions, const std::optional<at::Tensor>& cos_opt,
                const std::optional<at::Tensor>& sin_opt) {
  CHECK_DIM(q, 4, "[B, S, Hq, D]");
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  CHECK_DIM(k, 4, "[B, S, Hkv, D]");
  const int64_t Hkv = k.size(2);
  CHECK_SHAPE(k, B, S, Hkv, D);
  CHECK_SHAPE(v, B, S, Hkv, D);
  CHECK_DIM(k_cache, 4, "[B, Hkv, T_max, D]");
  CHECK_SHAPE(k_cache, B, Hkv, k_cache.size(2), D);
  CHECK_SHAPE(v_cache, B, Hkv, k_cache.size(2), D);
  CHECK_SHAPE(positions, B, S);
  CHECK_FLOATING(q);
  CHECK_SAME_DTYPE(k, q);
  CHECK_SAME_DTYPE(v, q);
  CHECK_CACHE_DTYPE(k_cache, q);
  CHECK_SAME_DTYPE(v_cache, k_cache);
  CHECK_INDEX(positions);
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
  CHECK_CONTIGUOUS(k_cache);
  CHECK_CONTIGUOUS(v_cache);
  for (const at::Tensor* t : {&q, &k, &v, &k_cache, &v_cache, &positions}) {
    HE_CHECK(t->device().is_cpu(), "q, k, v, k_cache, v_cache and positions must be CPU tensors, got ", t->device());
  }
  HE_CHECK(cos_opt.has_value() == sin_opt.has_value(), "cos and sin must be given together");
  if (!cos_opt.has_value()) return;
  const at::Tensor &cos = *cos_opt, &sin = *sin_opt;  // named so that the check messages name them
  CHECK_DIM(cos, 2, "[P, R/2]");
  const int64_t half = cos.size(1);
  HE_CHECK(half >= 1 && 2 * half <= D, "cos must have R/2 columns with 1 <= R/2 and R <= D = ", D, ", got shape ",
           shape_str(cos));
  CHECK_SHAPE(sin, cos.size(0), half);
  CHECK_DTYPE(cos, at::kFloat);
  CHECK_DTYPE(sin, at::kFloat);
  CHECK_CPU(cos);
  CHECK_CPU(sin);
}

}  // namespace

void rotary_append_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin) {
  check_args(q, k, v, k_cache, v_cache, positions, cos, sin);
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int64_t T_max = k_cache.size(2);
  if (B * S == 0 || D == 0) return;
  const auto pos = positions.contiguous();
  const auto c = cos.has_value() ? cos->contiguous() : at::Tensor();
  const auto s = sin.has_value() ? sin->contiguous() : at::Tensor();
  const int64_t P = cos.has_value() ? c.size(0) : -1;
  // Tokens per parallel task: at least 64K elements of q, k and v. A decode step (a few microseconds
  // of work) then stays on one thread: waking a second one costs as much, and far more when the core
  // is busy with another process.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (Hq + 2 * Hkv) * D));
  HE_DISPATCH_STORAGE(q.scalar_type(), "rotary_append_kv_cpu", [&] {
    dispatch_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto cache_tag) {
      using cache_t = decltype(cache_tag);
      HE_DISPATCH_INDEX(pos.scalar_type(), "rotary_append_kv_cpu", [&] {
        check_positions(pos.data_ptr<index_t>(), B, S, T_max, P);
        const Args<scalar_t, cache_t, index_t> a{q.data_ptr<scalar_t>(),
                                                 k.data_ptr<scalar_t>(),
                                                 k_cache.data_ptr<cache_t>(),
                                                 v_cache.data_ptr<cache_t>(),
                                                 v.data_ptr<scalar_t>(),
                                                 pos.data_ptr<index_t>(),
                                                 cos.has_value() ? c.data_ptr<float>() : nullptr,
                                                 sin.has_value() ? s.data_ptr<float>() : nullptr,
                                                 S,
                                                 Hq,
                                                 Hkv,
                                                 D,
                                                 T_max,
                                                 cos.has_value() ? c.size(1) : 0,
                                                 q.stride(0),
                                                 q.stride(1),
                                                 q.stride(2),
                                                 k.stride(0),
                                                 k.stride(1),
                                                 k.stride(2),
                                                 v.stride(0),
                                                 v.stride(1),
                                                 v.stride(2)};
        at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) { process_tokens(a, begin, end); });
      });
    });
  });
}

}  // namespace hybrid_engine

// ---- rotary_embed: the training forward's rotary embedding (HF's apply_rotary_pos_emb), differentiable ----
#undef HE_OP
#define HE_OP "rotary_embed"

namespace hybrid_engine {
namespace {

// One row of D = 2 half elements: (y1, y2) = (x1 c1 - x2 s1, x2 c2 + x1 s2) forward; the transpose
// (g1 c1 + g2 s2, g2 c2 - g1 s1) backward, which is the gradient of the forward with respect to x.
template <typename T>
void rotate_row(const T* x, const float* c, const float* s, T* y, int64_t half, bool backward) {
  for (int64_t i = 0; i < half; i += kWidth) {
    const int64_t n = std::min(kWidth, half - i);
    const fVec x1 = vec_io::load(x + i, n), x2 = vec_io::load(x + half + i, n);
    const fVec c1 = vec_io::load(c + i, n), c2 = vec_io::load(c + half + i, n);
    const fVec s1 = vec_io::load(s + i, n), s2 = vec_io::load(s + half + i, n);
    if (backward) {
      vec_io::store(y + i, x1 * c1 + x2 * s2, n);
      vec_io::store(y + half + i, x2 * c2 - x1 * s1, n);
    } else {
      vec_io::store(y + i, x1 * c1 - x2 * s1, n);
      vec_io::store(y + half + i, x2 * c2 + x1 * s2, n);
    }
  }
}

// x [B, H, T, D] (last dim contiguous) -> contiguous [B, H, T, D]; cos/sin fp32 [Bc, T, D], Bc = 1 or B.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  auto out = at::empty({B, H, T, D}, x.options());
  const int64_t cos_b = cos.size(0) == 1 ? 0 : T * D;
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  HE_DISPATCH_STORAGE(x.scalar_type(), "rotary_embed", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float *cp = cos.data_ptr<float>(), *spn = sin.data_ptr<float>();
    at::parallel_for(0, B * H * T, std::max<int64_t>(1, 32768 / D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (H * T), h = r / T % H, t = r % T;
        const int64_t cs = b * cos_b + t * D;
        rotate_row(xp + b * sb + h * sh + t * st, cp + cs, spn + cs, op + r * D, half, backward);
      }
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_embed_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin, bool backward) {
  CHECK_DIM(q, 4, "[B, Hq, T, D]");
  CHECK_DIM(k, 4, "[B, Hkv, T, D]");
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  CHECK_SIZE(k, 0, B);
  CHECK_SIZE(k, 2, T);
  CHECK_SIZE(k, 3, D);
  HE_CHECK(D % 2 == 0, "head dim D must be even, got ", D);
  CHECK_FLOATING(q);
  CHECK_SAME_DTYPE(k, q);
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_DIM(cos, 3, "[B or 1, T, D]");
  HE_CHECK((cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == T && cos.size(2) == D,
           "cos must be [", B, " or 1, ", T, ", ", D, "], got ", shape_str(cos));
  CHECK_SHAPE(sin, cos.size(0), T, D);
  CHECK_DTYPE(cos, at::kFloat);
  CHECK_DTYPE(sin, at::kFloat);
  CHECK_CONTIGUOUS(cos);
  CHECK_CONTIGUOUS(sin);
  for (const at::Tensor* t : {&q, &k, &cos, &sin}) {
    HE_CHECK(t->device().is_cpu(), "q, k, cos and sin must be CPU tensors, got ", t->device());
  }
  return {rotate(q, cos, sin, backward), rotate(k, cos, sin, backward)};
}

}  // namespace hybrid_engine
