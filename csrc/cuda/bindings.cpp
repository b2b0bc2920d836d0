// The thin layer between torch and the torch-free CUDA kernels: argument checks, output
// allocation, raw pointers and the current stream. Compiled only into CUDA builds of the extension
// (HYBRID_ENGINE_CUDA); the kernels themselves live in csrc/cuda/<family>.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cuda/gae.h"
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
// ---- end attention ----


// ---- rotary ----
// ---- end rotary ----


// ---- norm ----
// ---- end norm ----


// ---- logprobs ----
// ---- end logprobs ----


// ---- reshard ----
// ---- end reshard ----


// ---- linear ----
// ---- end linear ----

}  // namespace hybrid_engine
