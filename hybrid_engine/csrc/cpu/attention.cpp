// Attention on the CPU: decode (one new query token per sequence against its KV cache) and causal
// prefill over a left-padded prompt batch. Both keep an online (streaming) softmax in fp32 and
// serve grouped-query attention by processing all query heads of a KV head together, so each key
// and value row is fetched from memory once per group.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cpu/kv_types.h"
#include "hybrid_engine/ops.h"

namespace hybrid_engine {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVL = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// fp32, bf16 and fp16 only: CHECK_FLOATING has rejected every other dtype before dispatch.
#define HE_DISPATCH_ATTENTION(dtype, ...)                                                 \
  AT_DISPATCH_SWITCH(dtype, HE_OP, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                                       AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)        \
                                           AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// kVL consecutive elements as fp32 (bf16/fp16 widened on load).
inline Vec load_f32(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_f32(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

// Calls f(std::integral_constant<int, n>) for n in [1, 4] (larger n as 4): the extents of the
// register tiles below are compile-time constants.
template <typename F>
inline void dispatch_1_to_4(int64_t n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Vectors per row of a register tile: four heads (or rows) x kTileCols vectors of accumulators.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileCols = 4;  // 16 of the 32 zmm registers hold accumulators
#else
constexpr int kTileCols = 2;  // 8 of the 16 ymm registers
#endif

// Sequence lengths as int64, each checked against [0, limit]: a bad length would read past the cache.
std::vector<int64_t> checked_lengths(const char* op, const at::Tensor& seq_lens, int64_t limit,
                                     const char* limit_name) {
  const auto lens = seq_lens.contiguous();
  std::vector<int64_t> out(lens.numel());
  HE_DISPATCH_INDEX(lens.scalar_type(), "seq_lens", [&] {
    const index_t* p = lens.data_ptr<index_t>();
    for (size_t b = 0; b < out.size(); ++b) out[b] = static_cast<int64_t>(p[b]);
  });
  for (size_t b = 0; b < out.size(); ++b) {
    TORCH_CHECK(out[b] >= 0 && out[b] <= limit, op, ": seq_lens[", b, "] = ", out[b], " is outside [0, ", limit_name,
                " = ", limit, "]");
  }
  return out;
}

// ---- decode_attention ----

// Keys per online-softmax step: a block of value rows (32 KiB in fp32 at D = 128) stays in L1
// while every head tile sweeps it.
constexpr int64_t kDecodeBlock = 64;

// scores[g][t] = <qf[g], k_t> for GT heads and KT keys: GT * KT independent FMA chains, and each
// key vector is loaded once for the GT heads. qf is fp32 (pre-scaled), rows are in the cache dtype.
template <int GT, int KT, typename T>
inline void score_tile(const float* qf, int64_t Dp, const T* k, int64_t D, float* scores, int64_t s_stride) {
  Vec acc[GT][KT];
  for (int g = 0; g < GT; ++g)
    for (int t = 0; t < KT; ++t) acc[g][t] = Vec(0.f);
  const int64_t Dv = D / kVL * kVL;
  for (int64_t d = 0; d < Dv; d += kVL) {
    Vec kv[KT];
    for (int t = 0; t < KT; ++t) kv[t] = load_f32(k + t * D + d);
    for (int g = 0; g < GT; ++g) {
      const Vec qv = Vec::loadu(qf + g * Dp + d);
      for (int t = 0; t < KT; ++t) acc[g][t] = at::vec::fmadd(qv, kv[t], acc[g][t]);
    }
  }
  for (int g = 0; g < GT; ++g) {
    for (int t = 0; t < KT; ++t) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[g][t]);
      for (int64_t d = Dv; d < D; ++d) sum += qf[g * Dp + d] * static_cast<float>(k[t * D + d]);
      scores[g * s_stride + t] = sum;
    }
  }
}

// acc[g][0, NV * kVL) += sum_{t < n} p[g][t] * v_t[0, NV * kVL) for GT heads: the accumulators stay
// in registers across the key block and each value vector is loaded once for the GT heads.
template <int GT, int NV, typename T>
inline void pv_tile(const float* p, int64_t p_stride, const T* v, int64_t D, int64_t n, float* acc, int64_t Dp) {
  Vec a[GT][NV];
  for (int g = 0; g < GT; ++g)
    for (int j = 0; j < NV; ++j) a[g][j] = Vec::loadu(acc + g * Dp + j * kVL);
  for (int64_t t = 0; t < n; ++t) {
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load_f32(v + t * D + j * kVL);
    for (int g = 0; g < GT; ++g) {
      const Vec pg(p[g * p_stride + t]);
      for (int j = 0; j < NV; ++j) a[g][j] = at::vec::fmadd(pg, vv[j], a[g][j]);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int j = 0; j < NV; ++j) a[g][j].store(acc + g * Dp + j * kVL);
}

// Per-thread scratch of one (b, kv head) group: G query rows, G accumulators, a block of scores.
struct DecodeScratch {
  int64_t Dp;
  std::vector<float> qf, acc, scores, m, l;
  DecodeScratch(int64_t G, int64_t D)
      : Dp(round_up(D, kVL)), qf(G * Dp), acc(G * Dp), scores(G * kDecodeBlock), m(G), l(G) {}
};

// One (b, kv head): the G query heads q[g] (row stride q_head_stride) attend to keys/values [0, L)
// of k, v ([T_max, D] rows, in the cache's type C) and write out[g] (row stride D). Heads go in tiles of up to 4.
template <typename T, typename C>
void decode_group(const T* q, int64_t q_head_stride, const C* k, const C* v, T* out, int64_t L, int64_t G, int64_t D,
                  float scale, DecodeScratch& s) {
  const int64_t Dp = s.Dp, Dv = D / kVL * kVL;
  float *qf = s.qf.data(), *acc = s.acc.data(), *scores = s.scores.data();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < Dp; ++d) qf[g * Dp + d] = d < D ? static_cast<float>(q[g * q_head_stride + d]) * scale : 0;
  }
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.f);
  for (int64_t t0 = 0; t0 < L; t0 += kDecodeBlock) {
    const int64_t n = std::min(kDecodeBlock, L - t0);
    const C *kb = k + t0 * D, *vb = v + t0 * D;
    // 1. Scores, two keys at a time; each key row comes from memory once for the whole group.
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      dispatch_1_to_4(G - g0, [&](auto gt) {
        constexpr int GT = decltype(gt)::value;
        const float* qg = qf + g0 * Dp;
        float* sg = scores + g0 * kDecodeBlock;
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) score_tile<GT, 2>(qg, Dp, kb + t * D, D, sg + t, kDecodeBlock);
        if (t < n) score_tile<GT, 1>(qg, Dp, kb + t * D, D, sg + t, kDecodeBlock);
      });
    }
    // 2. Online softmax: rescale what was accumulated so far to the new running maximum.
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores + g * kDecodeBlock;
      const float block_max = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, sc, n);
      const float m_new = std::max(s.m[g], block_max);
      const float alpha = std::exp(s.m[g] - m_new);  // 0 on the first block (m = -inf)
      at::vec::map([m_new](Vec x) { return (x - Vec(m_new)).exp_u20(); }, sc, sc, n);
      s.l[g] = s.l[g] * alpha + at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, sc, n);
      s.m[g] = m_new;
      if (alpha != 1.f) at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, acc + g * Dp, acc + g * Dp, Dp);
    }
    // 3. acc[g] += p[g, t] * v_t, register-blocked over (head tile, column chunk).
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      dispatch_1_to_4(G - g0, [&](auto gt) {
        for (int64_t d = 0; d < Dv; d += kTileCols * kVL) {
          dispatch_1_to_4(std::min<int64_t>(kTileCols, (Dv - d) / kVL), [&](auto nv) {
            constexpr int GT = decltype(gt)::value, NV = decltype(nv)::value;
            pv_tile<GT, NV>(scores + g0 * kDecodeBlock, kDecodeBlock, vb + d, D, n, acc + g0 * Dp + d, Dp);
          });
        }
      });
    }
    for (int64_t d = Dv; d < D; ++d) {
      for (int64_t t = 0; t < n; ++t) {
        const float vd = static_cast<float>(vb[t * D + d]);
        for (int64_t g = 0; g < G; ++g) acc[g * Dp + d] += scores[g * kDecodeBlock + t] * vd;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    // seq_lens[b] == 0 leaves l = 0 and acc = 0: the row is zero.
    const float inv = s.l[g] > 0.f ? 1.f / s.l[g] : 0.f;
    float* row = acc + g * Dp;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, row, row, Dp);
    at::vec::convert(row, out + g * D, D);
  }
}

// ---- prefill_attention ----

// Query rows and keys per tile. Both tilings start at the sequence's first real token, so only
// the diagonal tile needs the causal mask and no padded row or key is ever computed.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

// Rows of the register tile of the small products (see kTileCols).
constexpr int kRows = 4;

// C[r][0, NV * kVL) (+)= sum_k A(r, k) * B[k][0, NV * kVL) for r < kRows, with
// A(r, k) = a[r * a_rs + k * a_ks] broadcast and B rows loaded as vectors.
template <int NV>
inline void gemm_tile(int64_t K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb, float* c,
                      int64_t ldc, bool accumulate) {
  Vec acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? Vec::loadu(c + r * ldc + j * kVL) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = Vec::loadu(b + k * ldb + j * kVL);
    for (int r = 0; r < kRows; ++r) {
      const Vec av(a[r * a_rs + k * a_ks]);
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j].store(c + r * ldc + j * kVL);
}

// C[M][N] (+)= A(M x K) B[K][N] for M a multiple of kRows and N a multiple of kVL.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < M; r += kRows) {
    for (int64_t n = 0; n < N; n += kTileCols * kVL) {
      dispatch_1_to_4(std::min<int64_t>(kTileCols, (N - n) / kVL), [&](auto nv) {
        gemm_tile<decltype(nv)::value>(K, a + r * a_rs, a_rs, a_ks, b + n, ldb, c + r * ldc + n, ldc, accumulate);
      });
    }
  }
}

// Per-thread scratch of one work item: G heads' transposed queries, outputs and softmax state,
// plus one key/value tile widened to fp32.
struct PrefillScratch {
  int64_t Dp;
  std::vector<float> qt, o, m, l, alpha, st, kf, vf;
  PrefillScratch(int64_t G, int64_t D)
      : Dp(round_up(D, kVL)),
        qt(G * D * kBlockQ),
        o(G * kBlockQ * Dp),
        m(G * kBlockQ),
        l(G * kBlockQ),
        alpha(kBlockQ),
        st(round_up(kBlockK, kRows) * kBlockQ),
        kf(round_up(kBlockK, kRows) * D, 0.f),
        vf(kBlockK * Dp, 0.f) {}
};

struct PrefillArgs {
  int64_t Hq, G, T, D;
  int64_t qs[3], ks[3], vs[3];  // strides of dims 0..2 (the last dim is contiguous)
  float scale;
};

// Rows [0, n) of a [*, D] strided block, widened to fp32 rows of length ld (zero-padded beyond D).
template <typename T>
void load_tile(const T* src, int64_t src_stride, int64_t n, int64_t D, float* dst, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    at::vec::convert(src + j * src_stride, dst + j * ld, D);
    std::fill(dst + j * ld + D, dst + (j + 1) * ld, 0.f);
  }
}

// One work item: query tile qb of sequence b for the G query heads of kv head kvh. Computes
// S^T = K Q^T per key tile (vectorised across queries), so the running max and sum of every query
// are updated in vector lanes, and P V is a broadcast-A product that needs no transpose of P.
template <typename T>
void prefill_tile(const PrefillArgs& p, const T* q, const T* k, const T* v, T* out, int64_t b, int64_t kvh,
                  int64_t qb, int64_t L, PrefillScratch& s) {
  const int64_t G = p.G, T_ = p.T, D = p.D, Dp = s.Dp, s0 = T_ - L;
  const int64_t i0 = s0 + qb * kBlockQ, nq = std::min(kBlockQ, T_ - i0);
  const int64_t nq_cols = round_up(nq, kVL), nq_rows = round_up(nq, kRows);
  if (qb == 0) {
    // Padded query rows [0, s0) of the group's heads are zero.
    for (int64_t g = 0; g < G; ++g) std::memset(out + ((b * p.Hq + kvh * G + g) * T_) * D, 0, s0 * D * sizeof(T));
  }
  if (nq <= 0) return;
  for (int64_t g = 0; g < G; ++g) {
    const T* qh = q + b * p.qs[0] + (kvh * G + g) * p.qs[1] + i0 * p.qs[2];
    float* qt = s.qt.data() + g * D * kBlockQ;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t i = 0; i < nq; ++i) qt[d * kBlockQ + i] = static_cast<float>(qh[i * p.qs[2] + d]) * p.scale;
      std::fill(qt + d * kBlockQ + nq, qt + d * kBlockQ + nq_cols, 0.f);
    }
  }
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.f);
  const T* kh = k + b * p.ks[0] + kvh * p.ks[1];
  const T* vh = v + b * p.vs[0] + kvh * p.vs[1];
  for (int64_t kb = 0; kb <= qb; ++kb) {
    const int64_t j0 = s0 + kb * kBlockK, nk = std::min(kBlockK, T_ - j0), nk_rows = round_up(nk, kRows);
    load_tile(kh + j0 * p.ks[2], p.ks[2], nk, D, s.kf.data(), D);
    load_tile(vh + j0 * p.vs[2], p.vs[2], nk, D, s.vf.data(), Dp);
    for (int64_t g = 0; g < G; ++g) {
      float* st = s.st.data();
      float *m = s.m.data() + g * kBlockQ, *l = s.l.data() + g * kBlockQ, *o = s.o.data() + g * kBlockQ * Dp;
      // S^T[j][i] = <k_j, q_i> * scale.
      gemm(nk_rows, nq_cols, D, s.kf.data(), D, 1, s.qt.data() + g * D * kBlockQ, kBlockQ, st, kBlockQ, false);
      if (kb == qb) {
        // Diagonal tile (j0 == i0): key j is in the future of query i when j > i.
        for (int64_t j = 1; j < nk; ++j) std::fill(st + j * kBlockQ, st + j * kBlockQ + std::min(j, nq_cols), kNegInf);
      }
      // The first key tile holds key s0, visible to every query, so m is finite from then on.
      for (int64_t i = 0; i < nq_cols; i += kVL) {
        const Vec m_old = Vec::loadu(m + i);
        Vec m_new = m_old;
        for (int64_t j = 0; j < nk; ++j) m_new = at::vec::maximum(m_new, Vec::loadu(st + j * kBlockQ + i));
        Vec sum(0.f);
        for (int64_t j = 0; j < nk; ++j) {
          const Vec e = (Vec::loadu(st + j * kBlockQ + i) - m_new).exp_u20();
          e.store(st + j * kBlockQ + i);
          sum = sum + e;
        }
        const Vec alpha = (m_old - m_new).exp_u20();
        at::vec::fmadd(Vec::loadu(l + i), alpha, sum).store(l + i);
        m_new.store(m + i);
        alpha.store(s.alpha.data() + i);
      }
      if (kb > 0) {
        for (int64_t i = 0; i < nq_rows; ++i) {
          const float a = s.alpha[i];
          if (a != 1.f) at::vec::map([a](Vec x) { return x * Vec(a); }, o + i * Dp, o + i * Dp, Dp);
        }
      }
      // O[i] += sum_j P^T[j][i] v_j; the first tile initialises O.
      gemm(nq_rows, Dp, nk, st, 1, kBlockQ, s.vf.data(), Dp, o, Dp, kb > 0);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* l = s.l.data() + g * kBlockQ;
    T* dst = out + ((b * p.Hq + kvh * G + g) * T_ + i0) * D;
    for (int64_t i = 0; i < nq; ++i) {
      float* row = s.o.data() + (g * kBlockQ + i) * Dp;
      const float inv = 1.f / l[i];
      at::vec::map([inv](Vec x) { return x * Vec(inv); }, row, row, Dp);
      at::vec::convert(row, dst + i * D, D);
    }
  }
}

// Runs f(item, scratch) for every item on all threads, each thread taking the next item when it
// finishes one: causal tiles and ragged lengths make item costs uneven, so static chunks would
// leave threads idle.
template <typename Make, typename F>
void parallel_dynamic(int64_t n, const Make& make_scratch, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i, scratch);
  });
}

// Whether bf16 prefill goes to torch's own flash attention (set by the calibration, ops/dispatch.py): 1
// where it was measured faster than the tiles above, 0 where not, -1 (the default, unmeasured) where torch
// runs bf16 GEMMs on AMX tiles (could_pack), about 4x faster than our fp32 FMA tiles on Sapphire Rapids.
std::atomic<int64_t> g_prefill_sdpa_bf16{-1};

// Whether torch's flash attention takes this bf16 batch: where the route above says so, unless the batch is
// ragged enough that computing every padded and future position (it gets only a mask) costs more than its
// speed buys. Measurements: hybrid_engine/ops/attention.py.
bool sdpa_wins(at::ScalarType dtype, const std::vector<int64_t>& lens, int64_t T) {
  const int64_t route = g_prefill_sdpa_bf16.load();
  if (dtype != at::kBFloat16 || lens.empty() || route == 0) return false;
  if (route < 0 && !at::native::cpublas::could_pack(dtype)) return false;
  double causal_work = 0.0;
  for (const int64_t L : lens) causal_work += static_cast<double>(L) * L;
  return 2.0 * causal_work >= static_cast<double>(lens.size()) * T * T;
}

// prefill_attention through at::scaled_dot_product_attention (bf16 only, see sdpa_wins) with the
// equivalent additive mask, written directly in q's dtype: building it from boolean tensor ops
// and letting SDPA convert it measured slower than the attention itself at T = 512.
at::Tensor prefill_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<int64_t>& lens, double scale) {
  const int64_t B = q.size(0), T = q.size(2);
  auto mask = at::empty({B, 1, T, T}, q.options());
  at::BFloat16* mp = mask.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % T, s0 = T - lens[r / T];
      for (int64_t j = 0; j < T; ++j) mp[r * T + j] = (j >= s0 && j <= i) ? 0.f : kNegInf;
    }
  });
  auto out = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, /*enable_gqa=*/true).contiguous();
  // Padded query rows see no key; the contract makes them zero whatever SDPA leaves there.
  for (size_t b = 0; b < lens.size(); ++b) {
    if (lens[b] < T) out.select(0, b).narrow(1, 0, T - lens[b]).zero_();
  }
  return out;
}

}  // namespace

// Shape, dtype, same-device and layout checks shared by the CPU and CUDA implementations
// (hybrid_engine/csrc/cuda/bindings.cpp); each then checks that q is on its own device type.
#define HE_OP "decode_attention"
void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens) {
  CHECK_DIM(q, 3, "[B, Hq, D]");
  CHECK_DIM(k_cache, 4, "[B, Hkv, T_max, D]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), T_max = k_cache.size(2);
  CHECK_SIZE(k_cache, 0, B);
  CHECK_SIZE(k_cache, 3, D);
  CHECK_SHAPE(v_cache, B, Hkv, T_max, D);
  CHECK_DIM(seq_lens, 1, "[B]");
  CHECK_SIZE(seq_lens, 0, B);
  HE_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k_cache heads (", Hkv, ")");
  HE_CHECK(D > 0 && D <= 256, "head dim D must be in [1, 256], got ", D);
  CHECK_FLOATING(q);
  CHECK_CACHE_DTYPE(k_cache, q);
  CHECK_SAME_DTYPE(v_cache, k_cache);
  CHECK_INDEX(seq_lens);
  CHECK_DEVICE(k_cache, q.device());
  CHECK_DEVICE(v_cache, q.device());
  CHECK_DEVICE(seq_lens, q.device());
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_CONTIGUOUS(k_cache);
  CHECK_CONTIGUOUS(v_cache);
}
#undef HE_OP

#define HE_OP "prefill_attention"
void check_prefill_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seq_lens) {
  CHECK_DIM(q, 4, "[B, Hq, T, D]");
  CHECK_DIM(k, 4, "[B, Hkv, T, D]");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  CHECK_SIZE(k, 0, B);
  CHECK_SIZE(k, 2, T);
  CHECK_SIZE(k, 3, D);
  CHECK_SHAPE(v, B, Hkv, T, D);
  CHECK_DIM(seq_lens, 1, "[B]");
  CHECK_SIZE(seq_lens, 0, B);
  HE_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k heads (", Hkv, ")");
  HE_CHECK(D > 0 && D <= 256, "head dim D must be in [1, 256], got ", D);
  CHECK_FLOATING(q);
  CHECK_SAME_DTYPE(k, q);
  CHECK_SAME_DTYPE(v, q);
  CHECK_INDEX(seq_lens);
  CHECK_DEVICE(k, q.device());
  CHECK_DEVICE(v, q.device());
  CHECK_DEVICE(seq_lens, q.device());
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
}
#undef HE_OP

void set_prefill_sdpa_route(int64_t route) {
  TORCH_CHECK(route >= -1 && route <= 1, "set_prefill_sdpa_route: the route must be -1 (where AMX is), 0 or 1, got ", route);
  g_prefill_sdpa_bf16 = route;
}

int64_t prefill_sdpa_route() { return g_prefill_sdpa_bf16.load(); }

#define HE_OP "decode_attention"
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seq_lens, double scale) {
  check_decode_attention_args(q, k_cache, v_cache, seq_lens);
  CHECK_CPU(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), T_max = k_cache.size(2);
  const auto lens = checked_lengths(HE_OP, seq_lens, T_max, "T_max");
  auto out = at::empty({B, Hq, D}, q.options());
  const int64_t G = Hq / Hkv;
  HE_DISPATCH_ATTENTION(q.scalar_type(), [&] {
    dispatch_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto cache_tag) {
      using cache_t = decltype(cache_tag);
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const cache_t *kp = k_cache.data_ptr<cache_t>(), *vp = v_cache.data_ptr<cache_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
      // One work item per (b, kv head): its G query heads share every key and value row it reads.
      at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        DecodeScratch scratch(G, D);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / Hkv, h = item % Hkv;
          const int64_t kv_off = (b * Hkv + h) * T_max * D;
          decode_group(qp + b * qs0 + h * G * qs1, qs1, kp + kv_off, vp + kv_off, op + (b * Hq + h * G) * D, lens[b],
                       G, D, static_cast<float>(scale), scratch);
        }
      });
    });
  });
  return out;
}
#undef HE_OP

#define HE_OP "prefill_attention"
at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& seq_lens, double scale) {
  check_prefill_attention_args(q, k, v, seq_lens);
  CHECK_CPU(q);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const auto lens = checked_lengths(HE_OP, seq_lens, T, "T");
  if (sdpa_wins(q.scalar_type(), lens, T)) return prefill_sdpa(q, k, v, lens, scale);
  auto out = at::empty({B, Hq, T, D}, q.options());
  const int64_t G = Hq / Hkv;
  const PrefillArgs args{Hq, G, T, D, {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                         {v.stride(0), v.stride(1), v.stride(2)}, static_cast<float>(scale)};
  // Work items (b, kv head, query tile); a tile's cost grows with its index (causal), so the
  // largest go first. Every (b, kv head) has a tile 0, which also zeroes the padded rows.
  struct Item {
    int64_t b, kvh, qb;
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tiles = std::max<int64_t>(1, (lens[b] + kBlockQ - 1) / kBlockQ);
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t qb = 0; qb < tiles; ++qb) items.push_back({b, h, qb});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.qb > y.qb; });
  HE_DISPATCH_ATTENTION(q.scalar_type(), [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_dynamic(
        static_cast<int64_t>(items.size()), [&] { return PrefillScratch(G, D); },
        [&](int64_t i, PrefillScratch& scratch) {
          const Item& it = items[i];
          prefill_tile(args, qp, kp, vp, op, it.b, it.kvh, it.qb, lens[it.b], scratch);
        });
  });
  return out;
}
#undef HE_OP

}  // namespace hybrid_engine
