// Weight re-sharding on the CPU: exact row-block copies between a tensor viewed flat and a dense
// [R, C] shard, for any dtype (the copy moves bytes, so fp32, bf16, fp16 and integers are all exact).
//
// Both ops walk the same plan: shard row i comes from flat row r(i) = row_starts[k] + (i - first[k])
// of block k, at flat offset `offset + r(i) * row_stride + col_start`. Work is split over the shard's
// elements, not its rows, so one long row (a 1-D bias) and many short rows (a row-parallel slice)
// both spread over the threads; inside a chunk each piece is one memcpy, and where the rows of a
// block are adjacent in the flat tensor (col_count == row_stride) the whole block is one memcpy.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

namespace hybrid_engine {
namespace {

// Checks a plan against a flat tensor of `numel` elements (named `flat_name` in messages) and
// returns the shard's row count. Every index stays inside the tensor, and the arithmetic is
// ordered so that no intermediate can overflow int64.
int64_t check_plan(const char* op, const char* flat_name, int64_t numel, int64_t offset, int64_t row_stride,
                   at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK(row_stride >= 0, op, ": row_stride must be >= 0, got ", row_stride);
  TORCH_CHECK(col_start >= 0, op, ": col_start must be >= 0, got ", col_start);
  TORCH_CHECK(col_count >= 0, op, ": col_count must be >= 0, got ", col_count);
  // Columns must stay inside a row, so that distinct rows never overlap (a scatter writes them in parallel).
  TORCH_CHECK(col_count <= row_stride - col_start, op, ": col_start + col_count (", col_start, " + ", col_count,
              ") must be <= row_stride (", row_stride, ")");
  TORCH_CHECK(row_starts.size() == row_counts.size(), op, ": row_starts and row_counts must have the same length, got ",
              row_starts.size(), " and ", row_counts.size());
  // How many rows fit: row r is in bounds iff offset + r * row_stride + col_start + col_count <= numel.
  const int64_t room = numel - std::min(offset, numel) - col_start - col_count;
  const int64_t rows_fit = (col_count == 0) ? INT64_MAX : (room < 0 || offset > numel) ? 0 : room / row_stride + 1;
  int64_t total = 0;
  for (size_t k = 0; k < row_starts.size(); ++k) {
    const int64_t s = row_starts[k], c = row_counts[k];
    TORCH_CHECK(s >= 0, op, ": row_starts[", k, "] must be >= 0, got ", s);
    TORCH_CHECK(c >= 0, op, ": row_counts[", k, "] must be >= 0, got ", c);
    TORCH_CHECK(c == 0 || (s < rows_fit && c <= rows_fit - s), op, ": rows [", s, ", ", s, " + ", c,
                ") of block ", k, " (row_starts[", k, "], row_counts[", k, "]) run past the end of ", flat_name, " (",
                numel, " elements; with offset ", offset, ", row_stride ", row_stride, " and columns [", col_start,
                ", ", col_start + col_count, ") only rows [0, ", rows_fit, ") fit)");
    TORCH_CHECK(c <= INT64_MAX - total, op, ": sum(row_counts) overflows int64");
    total += c;
  }
  return total;
}

// The plan in bytes, with first[k] = the shard row where block k begins (first.back() = R).
struct Plan {
  int64_t base;        // byte offset of (row 0, col_start) in the flat tensor
  int64_t row_stride;  // bytes between consecutive flat rows
  int64_t row_bytes;   // bytes of one shard row
  std::vector<int64_t> starts, first;
};

Plan make_plan(int64_t elem_size, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
               at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  Plan p{(offset + col_start) * elem_size, row_stride * elem_size, col_count * elem_size,
         std::vector<int64_t>(row_starts.begin(), row_starts.end()), {0}};
  for (const int64_t c : row_counts) p.first.push_back(p.first.back() + c);
  return p;
}

// Copies n bytes with the capability's widest vectors (64 bytes under AVX-512, 32 under AVX2). Inlined
// rather than a memcpy call: the pieces are often one row of a few KiB, where memcpy's call and size
// dispatch made strided copies ~10-15% slower than this loop (measured on Sapphire Rapids).
inline void copy_bytes(char* __restrict dst, const char* __restrict src, int64_t n) {
  using Vec = at::vec::Vectorized<int8_t>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    // Both loads before either store: two independent lines in flight per iteration.
    const Vec a = Vec::loadu(src + i), b = Vec::loadu(src + i + W);
    a.store(dst + i);
    b.store(dst + i + W);
  }
  for (; i + W <= n; i += W) Vec::loadu(src + i).store(dst + i);
  if (i < n) std::memcpy(dst + i, src + i, n - i);
}

// Copies shard bytes [begin, end) to (kGather: from) their places in the flat tensor.
template <bool kGather>
void copy_range(char* flat, char* shard, const Plan& p, int64_t begin, int64_t end) {
  const int64_t R = p.first.back();
  int64_t i = begin / p.row_bytes, j = begin % p.row_bytes;
  // The block holding shard row i: the last k with first[k] <= i (empty blocks are skipped below).
  size_t k = std::upper_bound(p.first.begin(), p.first.end(), i) - p.first.begin() - 1;
  // Adjacent flat rows: a run of rows is one contiguous piece on both sides.
  const bool whole_rows = p.row_bytes == p.row_stride;
  for (int64_t b = begin; b < end && i < R;) {
    while (i >= p.first[k + 1]) ++k;
    const int64_t rows_left = p.first[k + 1] - i;
    const int64_t n = std::min(end - b, whole_rows ? rows_left * p.row_bytes - j : p.row_bytes - j);
    char* f = flat + p.base + (p.starts[k] + (i - p.first[k])) * p.row_stride + j;
    char* s = shard + b;
    if (kGather) {
      copy_bytes(s, f, n);
    } else {
      copy_bytes(f, s, n);
    }
    b += n;
    j += n;
    i += j / p.row_bytes;
    j %= p.row_bytes;
  }
}

template <bool kGather>
void copy_plan(char* flat, char* shard, const Plan& p) {
  const int64_t total = p.first.back() * p.row_bytes;
  if (total == 0) return;
  // Below ~256 KiB a second thread costs more to wake than the copy it would take over.
  constexpr int64_t kGrainBytes = 256 * 1024;
  at::parallel_for(0, total, kGrainBytes,
                   [&](int64_t begin, int64_t end) { copy_range<kGather>(flat, shard, p, begin, end); });
}

}  // namespace

// The device-independent argument checks of both ops, shared with the CUDA binding
// (hybrid_engine/csrc/cuda/bindings.cpp) so that both devices reject the same calls with the same messages.
// Each returns the shard's row count.
#define HE_OP "reshard_gather"
int64_t check_reshard_gather_args(const at::Tensor& src, int64_t offset, int64_t row_stride,
                                  at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start,
                                  int64_t col_count) {
  // The plan addresses src's elements flat, which only means something for a contiguous tensor.
  CHECK_CONTIGUOUS(src);
  return check_plan(HE_OP, "src", src.numel(), offset, row_stride, row_starts, row_counts, col_start, col_count);
}

at::Tensor reshard_gather_cpu(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                              at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  CHECK_CPU(src);
  const int64_t R = check_reshard_gather_args(src, offset, row_stride, row_starts, row_counts, col_start, col_count);
  auto out = at::empty({R, col_count}, src.options());
  const Plan p = make_plan(src.element_size(), offset, row_stride, row_starts, row_counts, col_start, col_count);
  copy_plan<true>(static_cast<char*>(src.data_ptr()), static_cast<char*>(out.data_ptr()), p);
  return out;
}
#undef HE_OP

#define HE_OP "reshard_scatter"
int64_t check_reshard_scatter_args(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                                   at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start) {
  CHECK_CONTIGUOUS(dst);
  CHECK_DIM(shard, 2, "[sum(row_counts), C]");
  CHECK_SAME_DTYPE(shard, dst);
  const int64_t R =
      check_plan(HE_OP, "dst", dst.numel(), offset, row_stride, row_starts, row_counts, col_start, shard.size(1));
  CHECK_SIZE(shard, 0, R);
  // Reading the shard while writing dst over it would race.
  at::assert_no_overlap(dst, shard);
  return R;
}

void reshard_scatter_cpu(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                         at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start) {
  CHECK_CPU(dst);
  CHECK_CPU(shard);
  check_reshard_scatter_args(dst, shard, offset, row_stride, row_starts, row_counts, col_start);
  const auto s = shard.contiguous();
  const Plan p = make_plan(dst.element_size(), offset, row_stride, row_starts, row_counts, col_start, s.size(1));
  copy_plan<false>(static_cast<char*>(dst.data_ptr()), static_cast<char*>(s.data_ptr()), p);
}
#undef HE_OP

}  // namespace hybrid_engine
