// decode_linear with a bf16 weight on AMX tiles. The activations are split exactly into three bf16 terms,
// x = hi + mid + lo (each the top 8 significant bits of what is left), so every weight x term product is exact
// in fp32 and the tile unit accumulates in fp32: the fp32 result of the FMA path
// (hybrid_engine/csrc/cpu/linear.cpp) at several times its rate. (An infinite x gives NaN here instead of
// inf.) An fp32 weight split the same way needs six products and a split per weight; measured on the
// whole-model benchmark it is no faster than the FMA path, so fp32 weights stay there.
// Tiles: A = 16 weight rows x 32 K (read in place from the weight), B = 16 K pairs x 16 activation rows (packed
// once per call), C = fp32 [16 weight rows, 16 activation rows]. A block is 32 weight rows (A tiles 4, 5) x 32
// activation rows (B tiles 6, 7) in C tiles 0-3, with K streamed once.
#include "linear_amx.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace hybrid_engine::amx {
namespace {

constexpr int64_t kTerms = 3, kRows = 32, kTile = 256;  // kTile: 32-bit elements per tile (1 KB)
// Blocks ahead that the weight stream is prefetched (into L2): enough lines in flight to cover the latency.
constexpr int64_t kPrefetchBlocks = 1;

// Splits 32 floats into bf16 terms, one call per term: each term is the top 16 bits of what is left, returned
// as 32 bf16 in order (16 B-tile pairs); v0, v1 keep the remainder.
struct Splitter {
  __m512i upper, mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  Splitter() {
    alignas(64) int16_t words[32];
    for (int i = 0; i < 32; ++i) words[i] = static_cast<int16_t>(2 * i + 1);  // the upper word of float i
    upper = _mm512_load_si512(words);
  }
  __m512i next(__m512& v0, __m512& v1) const {
    const __m512i t0 = _mm512_and_si512(_mm512_castps_si512(v0), mask);
    const __m512i t1 = _mm512_and_si512(_mm512_castps_si512(v1), mask);
    v0 = _mm512_sub_ps(v0, _mm512_castsi512_ps(t0));
    v1 = _mm512_sub_ps(v1, _mm512_castsi512_ps(t1));
    return _mm512_permutex2var_epi16(t0, upper, t1);
  }
};

// xb[t][K / 32][J][16 pairs][16 rows] (J = activation tiles): B tile (t, s, j) at ((t * K / 32 + s) * J + j) *
// kTile. Rows past M stay zero.
void pack_x(const float* x, int64_t M, int64_t K, int64_t J, uint32_t* xb) {
  const int64_t steps = K / 32;
  std::fill(xb, xb + kTerms * steps * J * kTile, 0u);
  const Splitter split;
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < steps; ++s) {
      __m512 v0 = _mm512_loadu_ps(x + m * K + 32 * s), v1 = _mm512_loadu_ps(x + m * K + 32 * s + 16);
      for (int64_t t = 0; t < kTerms; ++t) {
        // Pair p of this row is element (p, m % 16) of the tile: a scatter with a 64-byte stride.
        uint32_t* tile = xb + ((t * steps + s) * J + m / 16) * kTile + m % 16;
        _mm512_i32scatter_epi32(tile, rows, split.next(v0, v1), 4);
      }
    }
  }
}

// C tiles 0-3 = (A 4 | A 5) x (B 6 | B 7) summed over K, stored to c[4][16][16]. two_a: 32 weight rows, else 16;
// two_b: 32 activation rows, else 16. `pf_lines` cache lines from `pf` (a later block) are prefetched on the way.
template <bool two_a, bool two_b>
__attribute__((target("amx-tile,amx-bf16"))) void block(const at::BFloat16* w, int64_t K, const uint32_t* xb,
                                                          int64_t J, const char* pf, int64_t pf_lines, float* c) {
  const int64_t steps = K / 32, per_term = (pf_lines + kTerms * steps - 1) / (kTerms * steps);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, w + 32 * s, K * 2);
    if (two_a) _tile_loadd(5, w + 16 * K + 32 * s, K * 2);
    for (int64_t t = 0; t < kTerms; ++t) {
      // Spread over the tile products: a burst would wait for fill buffers and hold up the tile loads.
      for (int64_t i = 0; i < per_term && pf_lines > 0; ++i, --pf_lines, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      const uint32_t* b = xb + (t * steps + s) * J * kTile;
      _tile_loadd(6, b, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (two_a) _tile_dpbf16ps(2, 5, 6);
      if (two_b) {
        _tile_loadd(7, b + kTile, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (two_a) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, 64);
  if (two_b) _tile_stored(1, c + kTile, 64);
  if (two_a) _tile_stored(2, c + 2 * kTile, 64);
  if (two_a && two_b) _tile_stored(3, c + 3 * kTile, 64);
}

// Blocks [begin, end) of kRows weight rows against all activation rows.
__attribute__((target("amx-tile,amx-bf16"))) void run_blocks(const uint32_t* xb, const at::BFloat16* weight,
                                                              const float* bias, float* out, int64_t M, int64_t N,
                                                              int64_t K, int64_t begin, int64_t end) {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  } config;
  _tile_loadconfig(&config);
  const int64_t J = (M + 15) / 16;
  std::vector<at::BFloat16> padded;  // the last, partial block of rows, zero-padded to kRows
  alignas(64) float c[4 * kTile];
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
    const at::BFloat16* w = weight + n0 * K;
    // A later block of this thread (contiguous rows) streams into L2 while this one computes.
    const char* next = reinterpret_cast<const char*>(w + kPrefetchBlocks * kRows * K);
    const int64_t next_lines =
        b + kPrefetchBlocks < end ? std::min(kRows, N - n0 - kPrefetchBlocks * kRows) * K * 2 / 64 : 0;
    if (rows < kRows) {
      padded.assign(kRows * K, at::BFloat16(0.f));
      std::copy(w, w + rows * K, padded.begin());
      w = padded.data();
    }
    for (int64_t j = 0; j < J; j += 2) {
      const bool two_b = j + 1 < J;
      const uint32_t* xj = xb + j * kTile;
      const int64_t pf_lines = j == 0 ? next_lines : 0;
      if (rows > 16) {
        two_b ? block<true, true>(w, K, xj, J, next, pf_lines, c) : block<true, false>(w, K, xj, J, next, pf_lines, c);
      } else {
        two_b ? block<false, true>(w, K, xj, J, next, pf_lines, c)
              : block<false, false>(w, K, xj, J, next, pf_lines, c);
      }
      // c[2 * a + i] is [16 weight rows, 16 activation rows]: out is its transpose.
      for (int64_t a = 0; a < 2 && 16 * a < rows; ++a) {
        for (int64_t i = 0; i < 2 && j + i < J; ++i) {
          for (int64_t mr = 0; mr < 16 && 16 * (j + i) + mr < M; ++mr) {
            float* o = out + (16 * (j + i) + mr) * N + n0 + 16 * a;
            const float* ct = c + (2 * a + i) * kTile + mr;
            for (int64_t r = 0; r < 16 && 16 * a + r < rows; ++r) {
              o[r] = ct[16 * r] + (bias ? bias[n0 + 16 * a + r] : 0.f);
            }
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

bool usable(int64_t K) {
  static const bool available = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    return it != caps.end() && it->second.toBool() && at::cpu::init_amx();
  }();
  return available && K % 32 == 0;
}

void decode_linear(const float* x, const at::BFloat16* weight, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K) {
  const int64_t J = (M + 15) / 16;
  auto xb = at::empty({kTerms * (K / 32) * J * kTile}, at::kInt);
  auto* xbp = reinterpret_cast<uint32_t*>(xb.data_ptr<int32_t>());
  pack_x(x, M, K, J, xbp);
  at::parallel_for(0, (N + kRows - 1) / kRows, 2, [&](int64_t begin, int64_t end) {
    run_blocks(xbp, weight, bias, out, M, N, K, begin, end);
  });
}

}  // namespace hybrid_engine::amx
#endif
