// decode_linear_bf16 on the CPU, generation's fast mode: out fp32 [M, N] = bf16(x) [M, K] @ weight bf16 [N, K]^T
// + bias, the activations rounded to bf16 once (round to nearest even), products of bf16 pairs summed in fp32.
// With AVX512-BF16 (VDPBF16PS: each 32-bit lane multiplies a pair of bf16 and adds both products to an fp32
// accumulator) the kernel below streams each weight row once for all M rows: twice the multiply-adds per
// instruction of decode_linear's fp32 FMA kernel, and no widening of the weight. A bf16 weight row [K] is already
// in pairs along K, and x is packed once per call as bf16 in the same order, so R weight rows x C activation rows
// of dot products accumulate in R * C vectors (horizontal sums at the end), as linear.cpp's FMA kernel does.
// From more than g_bf16_kernel_max_rows rows (prefill), torch's bf16 GEMM (oneDNN) takes over: its output is
// rounded to bf16 there. Without AVX512-BF16 in the build or the CPU, every M goes to torch's bf16 GEMM; the
// Python side refuses the fast mode on such a CPU (ops/linear.py), where it would only be slower.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#if defined(CPU_CAPABILITY_AVX512) && defined(HE_HAVE_AVX512BF16)
#include <immintrin.h>
#define HE_BF16DOT 1
#endif

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "decode_linear_bf16"

namespace hybrid_engine {
namespace {

// Above this many rows torch's bf16 GEMM; measured per machine by the calibration (ops/dispatch.py).
std::atomic<int64_t> g_bf16_kernel_max_rows{8};

#if defined(HE_BF16DOT)
constexpr int64_t S = 32;  // bf16 elements per vector (16 pairs)
constexpr int kMaxC = 8;
// Register budget (32 zmm): R * C accumulators + R weight vectors + one activation vector.
constexpr int kRowsFor[kMaxC + 1] = {0, 8, 8, 7, 6, 4, 4, 3, 3};
constexpr int64_t kPanelBytes = 256 << 10;  // weight rows re-read from L2 by each activation block

// x fp32 [M, K] -> xp bf16 [Mp, Kp]: rows past M and columns past K are zero.
void pack_x(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, at::BFloat16* xp) {
  for (int64_t m = 0; m < Mp; ++m) {
    at::BFloat16* dst = xp + m * Kp;
    for (int64_t k0 = 0; k0 < Kp; k0 += S) {
      const int64_t n = m < M ? std::clamp<int64_t>(K - k0, 0, S) : 0;
      const __mmask16 lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
      const __mmask16 hi = static_cast<__mmask16>(n >= S ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0);
      const float* src = x + m * K + k0;
      const __m512 a = _mm512_maskz_loadu_ps(lo, src), b = _mm512_maskz_loadu_ps(hi, src + 16);
      _mm512_storeu_si512(dst + k0, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // NOLINT: a same-size vector cast
    }
  }
}

// One step of 32 K elements: R weight rows (loaded under `mask`: the row's tail) by C packed activation rows.
template <int R, int C>
inline void dot_step(__m512 (&acc)[R * C], const at::BFloat16* w, int64_t K, const at::BFloat16* xs, int64_t Kp,
                     __mmask32 mask) {
  // The weights are loaded as bf16 vectors: a cast of an integer vector inside _mm512_dpbf16_ps made GCC keep every
  // accumulator in memory, stored on each step (3x slower).
  __m512bh wv[R];
  for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K);  // NOLINT
  for (int c = 0; c < C; ++c) {
    __m512i xi = _mm512_loadu_si512(xs + c * Kp);
    asm("" : "+v"(xi));  // pinned in a register, not folded into each of the R instructions that read it
    for (int r = 0; r < R; ++r) {
      acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], wv[r], (__m512bh)xi);  // NOLINT: a same-size cast
    }
  }
}

// out[(m0 + c) * N + n0 + r] = dot(weight row n0 + r, packed row m0 + c) + bias, for c < C with m0 + c < M. The rows
// of the next block (n0 + R) are prefetched along the way: short rows make short streams, which the hardware
// prefetcher alone fetches too late.
template <int R, int C>
void micro_tile(const at::BFloat16* w, int64_t K, const at::BFloat16* xs, int64_t Kp, const float* bias, float* out,
                int64_t n0, int64_t m0, int64_t M, int64_t N) {
  __m512 acc[R * C];
#pragma GCC unroll 64
  for (auto& a : acc) a = _mm512_setzero_ps();
  const int64_t full = K / S * S;
  const char* next = reinterpret_cast<const char*>(w + R * K);
  for (int64_t k0 = 0; k0 < full; k0 += S) {
    for (int r = 0; r < R; ++r) _mm_prefetch(next + (r * K + k0) * 2, _MM_HINT_T0);
    dot_step<R, C>(acc, w + k0, K, xs + k0, Kp, ~__mmask32{0});
  }
  if (full < K) dot_step<R, C>(acc, w + full, K, xs + full, Kp, static_cast<__mmask32>((1ull << (K - full)) - 1));
  float sums[R * C];
#pragma GCC unroll 64
  for (int i = 0; i < R * C; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
  for (int c = 0; c < C && m0 + c < M; ++c) {
    float* o = out + (m0 + c) * N + n0;
    for (int r = 0; r < R; ++r) o[r] = sums[r * C + c] + (bias ? bias[n0 + r] : 0.f);
  }
}

template <int C>
void run(const float* x, const at::BFloat16* weight, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  constexpr int R = kRowsFor[C];
  const int64_t Mp = (M + C - 1) / C * C, Kp = (K + S - 1) / S * S;
  auto xp = at::empty({Mp * Kp}, at::kBFloat16);
  at::BFloat16* xs = xp.data_ptr<at::BFloat16>();
  pack_x(x, M, K, Mp, Kp, xs);
  const int64_t blocks = (N + R - 1) / R;
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (R * std::max<int64_t>(K, 1) * 2));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (R * std::max<int64_t>(K, 1) * 2));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += panel) {
      const int64_t b1 = std::min(end, b0 + panel);
      for (int64_t m0 = 0; m0 < M; m0 += C) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * R;
          if (n0 + R <= N) {
            micro_tile<R, C>(weight + n0 * K, K, xs + m0 * Kp, Kp, bias, out, n0, m0, M, N);
          } else {
            for (int64_t n = n0; n < N; ++n) micro_tile<1, C>(weight + n * K, K, xs + m0 * Kp, Kp, bias, out, n, m0, M, N);
          }
        }
      }
    }
  });
}

void kernel(const float* x, const at::BFloat16* weight, const float* bias, float* out, int64_t M, int64_t N,
            int64_t K) {
  // Activation blocks of equal size C <= kMaxC.
  const int64_t nblocks = (M + kMaxC - 1) / kMaxC;
  switch ((M + nblocks - 1) / nblocks) {
    case 1: return run<1>(x, weight, bias, out, M, N, K);
    case 2: return run<2>(x, weight, bias, out, M, N, K);
    case 3: return run<3>(x, weight, bias, out, M, N, K);
    case 4: return run<4>(x, weight, bias, out, M, N, K);
    case 5: return run<5>(x, weight, bias, out, M, N, K);
    case 6: return run<6>(x, weight, bias, out, M, N, K);
    case 7: return run<7>(x, weight, bias, out, M, N, K);
    default: return run<8>(x, weight, bias, out, M, N, K);
  }
}
#endif

}  // namespace

void set_decode_linear_bf16_route(int64_t kernel_max_rows) {
  HE_CHECK(kernel_max_rows >= 0, "decode_linear_bf16's kernel_max_rows must be >= 0, got ", kernel_max_rows);
  g_bf16_kernel_max_rows = kernel_max_rows;
}

int64_t decode_linear_bf16_route() { return g_bf16_kernel_max_rows.load(); }

bool decode_linear_has_bf16dot() {
#if defined(HE_BF16DOT)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

at::Tensor decode_linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& maybe_bias) {
  CHECK_DIM(x, 2, "[M, K]");
  CHECK_DTYPE(x, at::kFloat);
  CHECK_CPU(x);
  CHECK_CONTIGUOUS(x);
  CHECK_DIM(weight, 2, "[N, K]");
  CHECK_SIZE(weight, 1, x.size(1));
  CHECK_DTYPE(weight, at::kBFloat16);
  CHECK_CPU(weight);
  CHECK_CONTIGUOUS(weight);
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor b;
  if (maybe_bias.has_value()) {
    CHECK_DIM(*maybe_bias, 1, "[N]");
    CHECK_SIZE(*maybe_bias, 0, N);
    CHECK_CPU(*maybe_bias);
    b = maybe_bias->to(at::kFloat).contiguous();
  }
  if (M > g_bf16_kernel_max_rows.load() || !decode_linear_has_bf16dot() || K == 0) {
    const at::Tensor out = at::mm(x.to(at::kBFloat16), weight.t()).to(at::kFloat);
    return b.defined() ? out.add_(b) : out;
  }
  auto out = at::empty({M, N}, x.options());
#if defined(HE_BF16DOT)
  if (M > 0 && N > 0) kernel(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), b.defined() ? b.data_ptr<float>() : nullptr,
                             out.data_ptr<float>(), M, N, K);
#endif
  return out;
}

}  // namespace hybrid_engine
