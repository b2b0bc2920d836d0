// The thin layer between torch and the torch-free CUDA kernels: argument checks, output
// allocation, raw pointers and the current stream. Compiled only into CUDA builds of the extension
// (HYBRID_ENGINE_CUDA); the kernels themselves live in csrc/cuda/<family>.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cuda/gae.h"
#include "hybrid_engine/cuda/reshard.h"
#include "hybrid_engine/cuda/attention.h"
// (one include per op family's launcher header, in the order of the sections below)
#include "hybrid_engine/ops.h"

#define HE_CUDA_CHECK(expr)                                                    \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    TORCH_CHECK(err_ == cudaSuccess, HE_OP, ": ", cudaGetErrorString(err_)); \
  } while (0)

namespace hybrid_engine {
namespace {
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
}  // namespace

// ---- gae ----
#define HE_OP "gae"
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                            double gamma, double lam) {
  CHECK_DIM(rewards, 2, "[B, T]");
  CHECK_SHAPE(values, rewards.size(0), rewards.size(1));
  CHECK_SHAPE(mask, rewards.size(0), rewards.size(1));
  CHECK_CUDA(rewards);
  CHECK_DEVICE(values, rewards.device());
  CHECK_DEVICE(mask, rewards.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto r = rewards.to(at::kFloat).contiguous(), v = values.to(at::kFloat).contiguous();
  const auto m = mask.to(at::kFloat).contiguous();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  HE_CUDA_CHECK(cuda::gae(r.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<float>(), adv.data_ptr<float>(),
                          ret.data_ptr<float>(), r.size(0), r.size(1), static_cast<float>(gamma),
                          static_cast<float>(lam), stream_of(r)));
  return {adv, ret};
}
#undef HE_OP
// ---- end gae ----


// ---- attention ----
namespace {
cuda::AttentionDtype attention_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return cuda::AttentionDtype::kBFloat16;
    case at::kHalf: return cuda::AttentionDtype::kFloat16;
    default: return cuda::AttentionDtype::kFloat32;
  }
}
cuda::Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
}  // namespace

// seq_lens values are not checked here: that would synchronise on every call. The kernels clamp
// them to the valid range instead, so a bad length cannot read out of bounds.
#define HE_OP "decode_attention"
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens, double scale) {
  CHECK_DIM(q, 3, "[B, Hq, D]");
  CHECK_DIM(k_cache, 4, "[B, Hkv, T_max, D]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), T_max = k_cache.size(2);
  CHECK_SIZE(k_cache, 0, B);
  CHECK_SIZE(k_cache, 3, D);
  CHECK_SHAPE(v_cache, B, Hkv, T_max, D);
  CHECK_DIM(seq_lens, 1, "[B]");
  CHECK_SIZE(seq_lens, 0, B);
  HE_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k_cache heads (", Hkv, ")");
  HE_CHECK(D > 0 && D <= 256, "head dim D must be in [1, 256], got ", D);
  CHECK_FLOATING(q);
  CHECK_SAME_DTYPE(k_cache, q);
  CHECK_SAME_DTYPE(v_cache, q);
  CHECK_INDEX(seq_lens);
  CHECK_CUDA(q);
  CHECK_DEVICE(k_cache, q.device());
  CHECK_DEVICE(v_cache, q.device());
  CHECK_DEVICE(seq_lens, q.device());
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_CONTIGUOUS(k_cache);
  CHECK_CONTIGUOUS(v_cache);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({B, Hq, D}, q.options());
  HE_CUDA_CHECK(cuda::decode_attention(attention_dtype(q), q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(),
                                       v_cache.data_ptr(), lens.data_ptr<int64_t>(), out.data_ptr(), B, Hq, Hkv, T_max,
                                       D, static_cast<float>(scale), stream_of(q)));
  return out;
}
#undef HE_OP

#define HE_OP "prefill_attention"
at::Tensor prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seq_lens, double scale) {
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
  CHECK_CUDA(q);
  CHECK_DEVICE(k, q.device());
  CHECK_DEVICE(v, q.device());
  CHECK_DEVICE(seq_lens, q.device());
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({B, Hq, T, D}, q.options());
  HE_CUDA_CHECK(cuda::prefill_attention(attention_dtype(q), q.data_ptr(), strides3(q), k.data_ptr(), strides3(k),
                                        v.data_ptr(), strides3(v), lens.data_ptr<int64_t>(), out.data_ptr(), B, Hq,
                                        Hkv, T, D, static_cast<float>(scale), stream_of(q)));
  return out;
}
#undef HE_OP
// ---- end attention ----


// ---- rotary ----
// ---- end rotary ----


// ---- norm ----
// ---- end norm ----


// ---- logprobs ----
// ---- end logprobs ----


// ---- reshard ----
// Defined in csrc/cpu/reshard.cpp, which every build compiles: both devices reject the same calls.
int64_t check_reshard_gather_args(const at::Tensor& src, int64_t offset, int64_t row_stride,
                                  at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start,
                                  int64_t col_count);
int64_t check_reshard_scatter_args(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                                   at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start);

namespace {
// Byte offsets of each block's first row in the flat tensor (strided) and in the shard (dense).
void reshard_block_starts(int64_t elem_size, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                          at::IntArrayRef row_counts, int64_t col_start, int64_t col_count, std::vector<int64_t>& flat,
                          std::vector<int64_t>& shard) {
  int64_t row = 0;
  for (size_t k = 0; k < row_starts.size(); ++k) {
    flat.push_back((offset + row_starts[k] * row_stride + col_start) * elem_size);
    shard.push_back(row * col_count * elem_size);
    row += row_counts[k];
  }
}
}  // namespace

#define HE_OP "reshard_gather"
at::Tensor reshard_gather_cuda(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                               at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  CHECK_CUDA(src);
  const int64_t R = check_reshard_gather_args(src, offset, row_stride, row_starts, row_counts, col_start, col_count);
  const c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({R, col_count}, src.options());
  const int64_t es = src.element_size();
  std::vector<int64_t> flat, shard;
  reshard_block_starts(es, offset, row_stride, row_starts, row_counts, col_start, col_count, flat, shard);
  HE_CUDA_CHECK(cuda::reshard_copy(src.data_ptr(), out.data_ptr(), col_count * es, row_stride * es, col_count * es,
                                   flat.data(), shard.data(), row_counts.data(), row_counts.size(), stream_of(src)));
  return out;
}
#undef HE_OP

#define HE_OP "reshard_scatter"
void reshard_scatter_cuda(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                          at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start) {
  CHECK_CUDA(dst);
  CHECK_DEVICE(shard, dst.device());
  check_reshard_scatter_args(dst, shard, offset, row_stride, row_starts, row_counts, col_start);
  const c10::cuda::CUDAGuard guard(dst.device());
  const auto s = shard.contiguous();
  const int64_t C = s.size(1), es = dst.element_size();
  std::vector<int64_t> flat, dense;
  reshard_block_starts(es, offset, row_stride, row_starts, row_counts, col_start, C, flat, dense);
  HE_CUDA_CHECK(cuda::reshard_copy(s.data_ptr(), dst.data_ptr(), C * es, C * es, row_stride * es, dense.data(),
                                   flat.data(), row_counts.data(), row_counts.size(), stream_of(dst)));
}
#undef HE_OP
// ---- end reshard ----


// ---- linear ----
// ---- end linear ----

}  // namespace hybrid_engine
