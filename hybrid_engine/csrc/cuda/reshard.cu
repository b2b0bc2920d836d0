// Weight re-sharding on the GPU: one strided row copy serves both reshard_gather and reshard_scatter.
// The copy is dtype-blind and vectorised: it moves the widest unit (16, 8, 4, 2 or 1 bytes) that every
// pointer, start, stride and row length is a multiple of, so an aligned bf16 or fp32 weight moves in
// 16-byte loads and stores. blockIdx.y/threadIdx.y pick rows, blockIdx.x/threadIdx.x walk along a row;
// the block table travels in the kernel's parameters (__grid_constant__), so nothing is copied to the
// device before the launch.
#include <algorithm>

#include "hybrid_engine/cuda/reshard.h"

namespace hybrid_engine::cuda {
namespace {

constexpr int kMaxBlocks = 16;  // blocks per launch; more are copied in several launches
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // units in flight per thread: independent loads before their stores

struct Block {
  int64_t src, dst;  // first row, in units
  int64_t first_row;  // the launch's row index of this block's first row
  int64_t row_units;  // units per row
};

struct Plan {
  int64_t src_stride, dst_stride;  // units between consecutive rows of a block
  int64_t rows;                    // rows in this launch
  int num_blocks;
  Block blocks[kMaxBlocks];
};

template <typename V>
__global__ void __launch_bounds__(kThreads)
    reshard_copy_kernel(const V* __restrict__ src, V* __restrict__ dst, const __grid_constant__ Plan plan) {
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x * kUnroll;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < plan.rows; i += row_step) {
    int k = 0;
    while (k + 1 < plan.num_blocks && plan.blocks[k + 1].first_row <= i) ++k;
    const Block& b = plan.blocks[k];
    const V* s = src + b.src + (i - b.first_row) * plan.src_stride;
    V* d = dst + b.dst + (i - b.first_row) * plan.dst_stride;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; j < b.row_units;
         j += col_step) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = j + static_cast<int64_t>(u) * blockDim.x;
        if (c < b.row_units) v[u] = s[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = j + static_cast<int64_t>(u) * blockDim.x;
        if (c < b.row_units) d[c] = v[u];
      }
    }
  }
}

// The widest unit (a power of two up to 16 bytes) dividing every byte quantity of the copy.
int64_t unit_bytes(const void* src, const void* dst, int64_t row_bytes, int64_t src_stride, int64_t dst_stride,
                   const int64_t* src_starts, const int64_t* dst_starts, int64_t num_blocks, bool whole_blocks,
                   const int64_t* row_counts) {
  uint64_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | 16u;
  bits |= static_cast<uint64_t>(row_bytes);
  if (!whole_blocks) bits |= static_cast<uint64_t>(src_stride) | static_cast<uint64_t>(dst_stride);
  for (int64_t k = 0; k < num_blocks; ++k) {
    bits |= static_cast<uint64_t>(src_starts[k]) | static_cast<uint64_t>(dst_starts[k]);
    if (whole_blocks) bits |= static_cast<uint64_t>(row_counts[k] * row_bytes);
  }
  return static_cast<int64_t>(bits & (~bits + 1));  // the lowest set bit
}

template <typename V>
cudaError_t launch(const void* src, void* dst, int64_t row_bytes, int64_t src_stride, int64_t dst_stride,
                   const int64_t* src_starts, const int64_t* dst_starts, const int64_t* row_counts, int64_t num_blocks,
                   bool whole_blocks, cudaStream_t stream) {
  constexpr int64_t w = sizeof(V);
  int64_t k = 0;
  while (k < num_blocks) {
    Plan plan{src_stride / w, dst_stride / w, 0, 0, {}};
    int64_t max_units = 0;
    for (; k < num_blocks && plan.num_blocks < kMaxBlocks; ++k) {
      if (row_counts[k] == 0) continue;
      // Rows adjacent on both sides: the whole block is one long row.
      const int64_t rows = whole_blocks ? 1 : row_counts[k];
      const int64_t units = (whole_blocks ? row_counts[k] * row_bytes : row_bytes) / w;
      plan.blocks[plan.num_blocks++] = {src_starts[k] / w, dst_starts[k] / w, plan.rows, units};
      plan.rows += rows;
      max_units = std::max(max_units, units);
    }
    if (plan.rows == 0) continue;
    // Threads along a row up to the row's length (in warps), the rest of the 256 on further rows.
    const int64_t per_row = (max_units + kUnroll - 1) / kUnroll;
    const int tx = static_cast<int>(std::min<int64_t>(kThreads, (per_row + 31) / 32 * 32));
    const dim3 threads(tx, kThreads / tx);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((per_row + tx - 1) / tx, 4096)),
                    static_cast<unsigned>(std::min<int64_t>((plan.rows + threads.y - 1) / threads.y, 65535)));
    reshard_copy_kernel<V><<<grid, threads, 0, stream>>>(static_cast<const V*>(src), static_cast<V*>(dst), plan);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t reshard_copy(const void* src, void* dst, int64_t row_bytes, int64_t src_stride, int64_t dst_stride,
                         const int64_t* src_starts, const int64_t* dst_starts, const int64_t* row_counts,
                         int64_t num_blocks, cudaStream_t stream) {
  if (row_bytes == 0) return cudaSuccess;
  const bool whole_blocks = src_stride == row_bytes && dst_stride == row_bytes;
  const int64_t w = unit_bytes(src, dst, row_bytes, src_stride, dst_stride, src_starts, dst_starts, num_blocks,
                               whole_blocks, row_counts);
  const auto run = [&](auto unit) {
    return launch<decltype(unit)>(src, dst, row_bytes, src_stride, dst_stride, src_starts, dst_starts, row_counts,
                                  num_blocks, whole_blocks, stream);
  };
  switch (w) {
    case 16: return run(uint4{});
    case 8: return run(uint2{});
    case 4: return run(uint32_t{});
    case 2: return run(uint16_t{});
    default: return run(uint8_t{});
  }
}

}  // namespace hybrid_engine::cuda
