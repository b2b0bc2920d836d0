// CUDA launcher for reshard (hybrid_engine/csrc/cuda/reshard.cu). Torch-free: raw pointers, sizes and a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// Copies num_blocks blocks of rows of row_bytes bytes each, dtype-blind: block k has row_counts[k] rows,
// the first at src + src_starts[k] and dst + dst_starts[k] (bytes), the next ones src_stride and
// dst_stride bytes further on. The three arrays live in host memory. reshard_gather is this copy from
// the strided flat tensor to the dense shard, reshard_scatter the same copy the other way round.
// Blocks must not overlap in dst.
cudaError_t reshard_copy(const void* src, void* dst, int64_t row_bytes, int64_t src_stride, int64_t dst_stride,
                         const int64_t* src_starts, const int64_t* dst_starts, const int64_t* row_counts,
                         int64_t num_blocks, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
