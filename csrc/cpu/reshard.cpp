// reshard: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "reshard"

namespace hybrid_engine {

at::Tensor reshard_gather_cpu(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                              at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  HE_CHECK(false, "not implemented yet");
}

void reshard_scatter_cpu(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                         at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
