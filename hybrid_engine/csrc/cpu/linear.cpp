// decode_linear on the CPU: out[M, N] = x[M, K] @ weight[N, K]^T + bias for the few activation rows of a
// generation step. The weight is the only large operand, so every weight row is streamed from memory once:
// each thread owns a contiguous range of N, and a register-blocked micro-kernel multiplies R weight rows by
// C activation rows at a time (R x C fp32 vector accumulators, K streamed once, horizontal sums at the end).
// With more than C activation rows, a panel of weight rows streamed by the first activation block is re-read
// from L2 by the others while the next panel is prefetched. On CPUs with AMX, larger M goes to the tile
// kernel of linear_amx.cpp instead.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"
#include "linear_amx.h"

#define HE_OP "decode_linear"

namespace hybrid_engine {
namespace {

// One vector of fp32 lanes per capability. load_lo/load_hi widen the two halves of S = 2L weights; bf16
// is widened without a shuffle (shift / mask of each 32-bit pair), which yields the even-indexed elements
// in `lo` and the odd-indexed ones in `hi`, so x is packed in that order for bf16 weights.
// reduce(v, n, out) writes the horizontal sums of n vectors to out[0..n).
#if defined(CPU_CAPABILITY_AVX512)
struct Vec {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  // Pinned in a register so the compiler does not fold it into each of the R FMAs that use it.
  static V load_x(const float* p) {
    V v = _mm512_loadu_ps(p);
    asm("" : "+v"(v));
    return v;
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // One step of S activations: copied, or split into (even elements, odd elements).
  static void pack_step(const float* src, float* dst, bool split) {
    const V a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + L);
    if (!split) {
      _mm512_storeu_ps(dst, a);
      _mm512_storeu_ps(dst + L, b);
      return;
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(dst + L, _mm512_permutex2var_ps(a, odd, b));
  }
  static V load_lo(const float* p) { return _mm512_loadu_ps(p); }
  static V load_hi(const float* p) { return _mm512_loadu_ps(p + L); }
  static V load_lo(const at::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
  }
  static V load_hi(const at::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(0xFFFF0000)));
  }
  static V load_lo(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load_hi(const at::Half* p) { return load_lo(p + L); }
  // 4 vectors -> lane j (128 bits) holds 4 partial sums of vector j.
  static V sum4(V a, V b, V c, V d) {
    const V ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const V cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  }
  // A transposing tree: 16 sums for about 3 instructions per vector instead of 8 for one reduce_add each.
  static void reduce(const V* v, int n, float* out) {
    const V z = zero();
    for (int i = 0; i < n; i += 16) {
      V g[4];
      for (int q = 0; q < 4; ++q) {
        const int f = i + 4 * q;
        g[q] = sum4(f < n ? v[f] : z, f + 1 < n ? v[f + 1] : z, f + 2 < n ? v[f + 2] : z, f + 3 < n ? v[f + 3] : z);
      }
      const V t0 = _mm512_add_ps(_mm512_unpacklo_ps(g[0], g[1]), _mm512_unpackhi_ps(g[0], g[1]));
      const V t1 = _mm512_add_ps(_mm512_unpacklo_ps(g[2], g[3]), _mm512_unpackhi_ps(g[2], g[3]));
      // Element 4j + q now holds the sum of vector i + 4q + j: transpose back to natural order.
      const V r = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
      const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
      alignas(64) float sums[16];
      _mm512_store_ps(sums, _mm512_permutexvar_ps(order, r));
      for (int j = 0; j < 16 && i + j < n; ++j) out[i + j] = sums[j];
    }
  }
};
// Register budget (32 zmm): R*C accumulators + R weight vectors + an activation vector + the bf16 mask.
constexpr int kMaxC = 8;
constexpr int kRowsFor[kMaxC + 1] = {0, 8, 8, 7, 6, 4, 4, 3, 3};
#elif defined(CPU_CAPABILITY_AVX2)
struct Vec {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load_x(const float* p) {
    V v = _mm256_loadu_ps(p);
    asm("" : "+x"(v));
    return v;
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void pack_step(const float* src, float* dst, bool split) {
    const V a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + L);
    if (!split) {
      _mm256_storeu_ps(dst, a);
      _mm256_storeu_ps(dst + L, b);
      return;
    }
    // In-lane shuffles give (0 2 8 10 4 6 12 14); swapping the middle 64-bit pairs sorts them.
    const auto sorted = [](V v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8)); };
    _mm256_storeu_ps(dst, sorted(_mm256_shuffle_ps(a, b, 0x88)));
    _mm256_storeu_ps(dst + L, sorted(_mm256_shuffle_ps(a, b, 0xDD)));
  }
  static V load_lo(const float* p) { return _mm256_loadu_ps(p); }
  static V load_hi(const float* p) { return _mm256_loadu_ps(p + L); }
  static __m256i raw(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V load_lo(const at::BFloat16* p) { return _mm256_castsi256_ps(_mm256_slli_epi32(raw(p), 16)); }
  static V load_hi(const at::BFloat16* p) {
    return _mm256_castsi256_ps(_mm256_and_si256(raw(p), _mm256_set1_epi32(0xFFFF0000)));
  }
  static V load_lo(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load_hi(const at::Half* p) { return load_lo(p + L); }
  // hadd tree: 8 vectors -> their 8 sums in order.
  static void reduce(const V* v, int n, float* out) {
    const V z = zero();
    for (int i = 0; i < n; i += 8) {
      V h[4];
      for (int q = 0; q < 4; ++q) {
        const int f = i + 2 * q;
        h[q] = _mm256_hadd_ps(f < n ? v[f] : z, f + 1 < n ? v[f + 1] : z);
      }
      const V u0 = _mm256_hadd_ps(h[0], h[1]), u1 = _mm256_hadd_ps(h[2], h[3]);
      const V r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
      alignas(32) float sums[8];
      _mm256_store_ps(sums, r);
      for (int j = 0; j < 8 && i + j < n; ++j) out[i + j] = sums[j];
    }
  }
};
// Register budget (16 ymm): R*C accumulators + R weight vectors + an activation vector + the bf16 mask.
constexpr int kMaxC = 4;
constexpr int kRowsFor[kMaxC + 1] = {0, 6, 4, 3, 2};
#else
// Portable fallback: "vectors" of one float; with L = 1 the bf16 pair order is the natural order.
struct Vec {
  using V = float;
  static constexpr int L = 1;
  static V zero() { return 0.f; }
  static V load_x(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static void pack_step(const float* src, float* dst, bool) { std::copy(src, src + 2, dst); }
  template <typename W>
  static V load_lo(const W* p) { return static_cast<float>(p[0]); }
  template <typename W>
  static V load_hi(const W* p) { return static_cast<float>(p[1]); }
  static void reduce(const V* v, int n, float* out) { std::copy(v, v + n, out); }
};
constexpr int kMaxC = 4;
constexpr int kRowsFor[kMaxC + 1] = {0, 4, 4, 3, 2};
#endif

constexpr int S = 2 * Vec::L;  // K elements per micro-kernel step
// K elements per pass over a weight block: the pass's activation block (C rows) stays in L1.
constexpr int64_t kChunkBytes = 32 << 10;
// Weight bytes per panel: the panel is re-read from L2 by every activation block after the first.
constexpr int64_t kPanelBytes = 64 << 10;
// Where torch's GEMM takes over, decided by measurement on the machine (hybrid_engine/ops/dispatch.py
// calibrates and sets these once per process, set_decode_linear_routes): an fp32 weight goes to torch for
// M <= fp32_torch_max_rows (its matrix-vector product streams at the read bandwidth on some machines, at a
// third of it on others) and for M > fp32_kernel_max_rows (compute-bound: its GEMM outruns this kernel); a bf16
// or fp16 weight is widened and goes to torch only for M > lowp_kernel_max_rows (prefill-sized M, where the
// widening copy is small beside the GEMM). On a CPU with AMX, a bf16 weight with M >= amx_min_rows goes to
// the tile kernel of linear_amx.cpp (below that the FMA kernel already streams the weight at the memory's
// rate). The defaults are the Sapphire Rapids measurements.
std::atomic<int64_t> g_fp32_torch_max_rows{1};
std::atomic<int64_t> g_fp32_kernel_max_rows{64};
std::atomic<int64_t> g_lowp_kernel_max_rows{64};
std::atomic<int64_t> g_amx_min_rows{8};

template <typename W>
constexpr bool kInterleaved = std::is_same_v<W, at::BFloat16>;

// x [M, K] -> xp [Mp / C][Kp / S][C][S]: activation blocks of C rows (rows past M are zero), K
// zero-padded to Kp, and each step's C x S values contiguous, so the micro-kernel reads them at fixed
// offsets from one pointer. For bf16 weights each S-block is ordered (even elements, odd elements).
template <typename W>
void pack_x(const float* x, int64_t M, int64_t K, int C, int64_t Mp, int64_t Kp, float* xp) {
  for (int64_t m = 0; m < Mp; ++m) {
    float* block = xp + (m / C) * Kp * C + (m % C) * S;
    for (int64_t k0 = 0; k0 < Kp; k0 += S) {
      float* dst = block + k0 * C;
      if (m < M && k0 + S <= K) {
        Vec::pack_step(x + m * K + k0, dst, kInterleaved<W>);
        continue;
      }
      // The zero padding: the last, partial step of a row, and the rows past M.
      float step[S] = {};
      for (int64_t k = k0; m < M && k < K; ++k) step[k - k0] = x[m * K + k];
      Vec::pack_step(step, dst, kInterleaved<W>);
    }
  }
}

// Walks the cache lines of a block of weight rows (a panel's K chunk), prefetching a few at a time into L2.
// The next unit of work (the panel's next K chunk, or the next panel) is fetched this way, spread over all
// of the current unit's tiles, so the memory stream stays busy while the tiles that re-read it compute.
struct LineWalker {
  const char* row = nullptr;  // current row's first byte of the chunk
  int64_t stride = 0;         // bytes between rows
  int64_t lines_per_row = 0;
  int64_t col = 0;            // current line in the row
  int64_t left = 0;           // lines still to fetch

  void fetch(int64_t n) {
    for (; n > 0 && left > 0; --n, --left) {
      __builtin_prefetch(row + col * 64, 0, 2);  // prefetcht1: into L2
      if (++col == lines_per_row) {
        col = 0;
        row += stride;
      }
    }
  }
};

// res[r * C + c] = dot(weight row r, activation row c) over `steps` steps of S, the last one possibly
// partial (`klast` valid elements). w: R rows with stride ldw; xs: packed [steps][C][S]. `pf` lines of the
// next panel are prefetched along the way.
template <typename W, int R, int C>
void micro_tile(const W* w, int64_t ldw, const float* xs, int64_t steps, int klast, LineWalker& pf,
                int64_t pf_lines, float* res) {
  using V = Vec::V;
  V acc[R * C];
  for (auto& a : acc) a = Vec::zero();
  auto step = [&](const W* wk, int64_t ld, const float* xk) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Vec::load_lo(wk + r * ld);
    for (int c = 0; c < C; ++c) {
      const V xv = Vec::load_x(xk + c * S);
      for (int r = 0; r < R; ++r) acc[r * C + c] = Vec::fma(wv[r], xv, acc[r * C + c]);
    }
    for (int r = 0; r < R; ++r) wv[r] = Vec::load_hi(wk + r * ld);
    for (int c = 0; c < C; ++c) {
      const V xv = Vec::load_x(xk + c * S + Vec::L);
      for (int r = 0; r < R; ++r) acc[r * C + c] = Vec::fma(wv[r], xv, acc[r * C + c]);
    }
  };
  const int64_t full = klast == S ? steps : steps - 1;
  const int64_t per_step = (pf_lines + steps - 1) / steps;
  for (int64_t i = 0; i < full; ++i) {
    pf.fetch(per_step);
    step(w + i * S, ldw, xs + i * C * S);
  }
  if (full < steps) {
    // The partial step reads a zero-padded copy of the weight tails, never past a row's end.
    W tail[R][S];
    std::memset(tail, 0, sizeof(tail));
    for (int r = 0; r < R; ++r) std::memcpy(tail[r], w + r * ldw + full * S, klast * sizeof(W));
    step(&tail[0][0], S, xs + full * C * S);
  }
  Vec::reduce(acc, R * C, res);
}

struct Problem {
  const float* xp;    // packed activations, see pack_x
  const float* bias;  // fp32 [N] or nullptr
  float* out;         // fp32 [M, N]
  int64_t M, N, K, Kp, chunk;  // chunk: K elements per pass (a multiple of S)
};

// Weight rows [n0, n0 + R) x activation block m0 over K range [k0, k0 + chunk): out = partial sum + bias
// on the first chunk, out += partial sum on the others.
template <typename W, int R, int C>
void tile(const Problem& p, const W* weight, int64_t n0, int64_t m0, int64_t k0, LineWalker& pf, int64_t pf_lines) {
  const int64_t len = std::min(p.chunk, p.K - k0);
  const int64_t steps = (len + S - 1) / S;
  const int klast = static_cast<int>(len - (steps - 1) * S);
  float res[R * C];
  micro_tile<W, R, C>(weight + n0 * p.K + k0, p.K, p.xp + m0 * p.Kp + k0 * C, steps, klast, pf, pf_lines, res);
  for (int c = 0; c < C && m0 + c < p.M; ++c) {
    float* o = p.out + (m0 + c) * p.N + n0;
    for (int r = 0; r < R; ++r) {
      const float v = res[r * C + c];
      o[r] = k0 == 0 ? v + (p.bias ? p.bias[n0 + r] : 0.f) : o[r] + v;
    }
  }
}

template <typename W, int C>
void run(const Problem& p, const W* weight) {
  constexpr int R = kRowsFor[C];
  const int64_t blocks = (p.N + R - 1) / R;
  const int64_t block_bytes = R * std::max<int64_t>(p.K, 1) * sizeof(W);
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (R * std::max<int64_t>(p.chunk, 1) * sizeof(W)));
  // Enough weight bytes per task that the threads' start-up cost stays small.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    // Walks the weight rows [n_begin, n_end) x K range [k0, k0 + chunk) of the next unit of work.
    auto lines_of = [&](int64_t b_begin, int64_t b_end, int64_t k0, LineWalker& walker) {
      const int64_t n_begin = b_begin * R, n_end = std::min(p.N, b_end * R);
      const int64_t bytes = std::min(p.chunk, p.K - k0) * static_cast<int64_t>(sizeof(W));
      walker = {reinterpret_cast<const char*>(weight + n_begin * p.K + k0), p.K * static_cast<int64_t>(sizeof(W)),
                (bytes + 63) / 64, 0, 0};
      walker.left = n_end > n_begin ? (n_end - n_begin) * walker.lines_per_row : 0;
    };
    // Panels of row blocks: each K chunk of a panel is streamed from memory once, by the first activation
    // block, and re-read from L2 by the others, while the activation block itself stays in L1.
    for (int64_t b0 = begin; b0 < end; b0 += panel) {
      const int64_t b1 = std::min(end, b0 + panel);
      for (int64_t k0 = 0; k0 < p.K; k0 += p.chunk) {
        LineWalker next;
        if (k0 + p.chunk < p.K) {
          lines_of(b0, b1, k0 + p.chunk, next);
        } else {
          lines_of(b1, std::min(end, b1 + panel), 0, next);
        }
        const int64_t tiles = (p.M + C - 1) / C * (b1 - b0);
        const int64_t per_tile = (next.left + tiles - 1) / tiles;
        for (int64_t m0 = 0; m0 < p.M; m0 += C) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t n0 = b * R;
            if (n0 + R <= p.N) {
              tile<W, R, C>(p, weight, n0, m0, k0, next, per_tile);
            } else {
              for (int64_t n = n0; n < p.N; ++n) tile<W, 1, C>(p, weight, n, m0, k0, next, per_tile);
            }
          }
        }
      }
    }
  });
}

// Activation rows per block, C <= kMaxC; the rows past M up to a multiple of C are zero and never stored. A
// low-precision weight (and any weight without AVX-512) takes blocks of equal size, as few as kMaxC allows. An fp32
// weight with AVX-512 takes the C in [4, kMaxC] (M itself below 4) that computes the fewest padded rows, each row
// weighted by its block's measured cost: blocks of 4 (R = 6 weight rows a tile) ran 1.05-1.10x faster per row than
// blocks of 5-8 at M = 8-64 on a Zen 4 (one thread, CPU time; ops/linear.py), blocks of 2 or 3 at 0.75-0.8x, so
// M = 5-7 keep one block of M rows and M = 9-10 take two of 5.
template <typename W>
int block_rows(int64_t M) {
  if (!std::is_same_v<W, float> || kMaxC < 8 || M < 4) {
    const int64_t nblocks = (M + kMaxC - 1) / kMaxC;
    return static_cast<int>((M + nblocks - 1) / nblocks);
  }
  int best = 4;
  int64_t best_cost = INT64_MAX;
  for (int c = 4; c <= kMaxC; ++c) {
    const int64_t cost = (M + c - 1) / c * c * (c == 4 ? 10 : 11);  // padded rows x cost per row
    if (cost < best_cost) best = c, best_cost = cost;
  }
  return best;
}

template <typename W>
void dispatch(const at::Tensor& x, const W* weight, const float* bias, float* out, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int C = block_rows<W>(M);
  const int64_t Kp = (K + S - 1) / S * S, Mp = (M + C - 1) / C * C;
  const int64_t chunk = std::max<int64_t>(S, kChunkBytes / (C * sizeof(float)) / S * S);
  auto xp = at::empty({Mp * Kp}, x.options());
  pack_x<W>(x.data_ptr<float>(), M, K, C, Mp, Kp, xp.data_ptr<float>());
  const Problem p{xp.data_ptr<float>(), bias, out, M, N, K, Kp, chunk};
  switch (C) {
    case 1: return run<W, 1>(p, weight);
    case 2: return run<W, 2>(p, weight);
    case 3: return run<W, 3>(p, weight);
    case 4: return run<W, 4>(p, weight);
#if defined(CPU_CAPABILITY_AVX512)
    case 5: return run<W, 5>(p, weight);
    case 6: return run<W, 6>(p, weight);
    case 7: return run<W, 7>(p, weight);
    case 8: return run<W, 8>(p, weight);
#endif
    default: TORCH_INTERNAL_ASSERT(false, "decode_linear: bad activation block ", C);
  }
}

}  // namespace

void set_decode_linear_routes(int64_t fp32_torch_max_rows, int64_t fp32_kernel_max_rows,
                              int64_t lowp_kernel_max_rows, int64_t amx_min_rows) {
  HE_CHECK(fp32_torch_max_rows >= 0 && fp32_kernel_max_rows >= fp32_torch_max_rows && lowp_kernel_max_rows >= 0 &&
               amx_min_rows >= 1,
           "decode_linear routes need 0 <= fp32_torch_max_rows <= fp32_kernel_max_rows, lowp_kernel_max_rows >= 0 "
           "and amx_min_rows >= 1, got ", fp32_torch_max_rows, ", ", fp32_kernel_max_rows, ", ", lowp_kernel_max_rows,
           ", ", amx_min_rows);
  g_amx_min_rows = amx_min_rows;
  g_fp32_torch_max_rows = fp32_torch_max_rows;
  g_fp32_kernel_max_rows = fp32_kernel_max_rows;
  g_lowp_kernel_max_rows = lowp_kernel_max_rows;
}

std::vector<int64_t> decode_linear_routes() {
  return {g_fp32_torch_max_rows.load(), g_fp32_kernel_max_rows.load(), g_lowp_kernel_max_rows.load(),
          g_amx_min_rows.load()};
}

bool decode_linear_has_amx(int64_t K) {
#if defined(CPU_CAPABILITY_AVX512)
  return amx::usable(K);
#else
  return false;
#endif
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& maybe_bias) {
  CHECK_DIM(x, 2, "[M, K]");
  CHECK_DTYPE(x, at::kFloat);
  CHECK_CPU(x);
  CHECK_CONTIGUOUS(x);
  CHECK_DIM(weight, 2, "[N, K]");
  CHECK_SIZE(weight, 1, x.size(1));
  CHECK_FLOATING(weight);
  CHECK_CPU(weight);
  CHECK_CONTIGUOUS(weight);
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor b;
  if (maybe_bias.has_value()) {
    const at::Tensor& bias = *maybe_bias;
    CHECK_DIM(bias, 1, "[N]");
    CHECK_SIZE(bias, 0, N);
    HE_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == weight.scalar_type(),
             "bias must be float32 or weight's dtype ", weight.scalar_type(), ", got ", bias.scalar_type());
    CHECK_CPU(bias);
    b = bias.to(at::kFloat).contiguous();
  }
  const bool fp32 = weight.scalar_type() == at::kFloat;
  if (fp32 ? (M <= g_fp32_torch_max_rows.load() || M > g_fp32_kernel_max_rows.load())
           : M > g_lowp_kernel_max_rows.load()) {
    const at::Tensor w = fp32 ? weight : weight.to(at::kFloat);
    return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (x.size(1) == 0) return b.defined() ? out.copy_(b.expand({M, N})) : out.zero_();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
#if defined(CPU_CAPABILITY_AVX512)
  if (weight.scalar_type() == at::kBFloat16 && M >= g_amx_min_rows.load() && amx::usable(x.size(1))) {
    amx::decode_linear(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), bp, op, M, N, x.size(1));
    return out;
  }
#endif
  switch (weight.scalar_type()) {
    case at::kFloat: dispatch(x, weight.data_ptr<float>(), bp, op, N); break;
    case at::kBFloat16: dispatch(x, weight.data_ptr<at::BFloat16>(), bp, op, N); break;
    default: dispatch(x, weight.data_ptr<at::Half>(), bp, op, N); break;
  }
  return out;
}

}  // namespace hybrid_engine
