// The thin layer between torch and the torch-free CUDA kernels: argument checks, output
// allocation, raw pointers and the current stream. Compiled only into CUDA builds of the extension
// (HYBRID_ENGINE_CUDA); the kernels themselves live in csrc/cuda/<family>.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cuda/gae.h"
#include "hybrid_engine/cuda/linear.h"
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
#define HE_OP "decode_linear"
at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& maybe_bias) {
  CHECK_DIM(x, 2, "[M, K]");
  CHECK_DTYPE(x, at::kFloat);
  CHECK_CUDA(x);
  CHECK_CONTIGUOUS(x);
  CHECK_DIM(weight, 2, "[N, K]");
  CHECK_SIZE(weight, 1, x.size(1));
  CHECK_FLOATING(weight);
  CHECK_DEVICE(weight, x.device());
  CHECK_CONTIGUOUS(weight);
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor b;
  if (maybe_bias.has_value()) {
    const at::Tensor& bias = *maybe_bias;
    CHECK_DIM(bias, 1, "[N]");
    CHECK_SIZE(bias, 0, N);
    HE_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == weight.scalar_type(),
             "bias must be float32 or weight's dtype ", weight.scalar_type(), ", got ", bias.scalar_type());
    CHECK_DEVICE(bias, x.device());
    b = bias.to(at::kFloat).contiguous();
  }
  const auto dtype = weight.scalar_type() == at::kFloat      ? cuda::WeightDtype::kFloat32
                     : weight.scalar_type() == at::kBFloat16 ? cuda::WeightDtype::kBFloat16
                                                             : cuda::WeightDtype::kFloat16;
  auto out = at::empty({M, N}, x.options());
  HE_CUDA_CHECK(cuda::decode_linear(x.data_ptr<float>(), weight.data_ptr(), dtype,
                                    b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K,
                                    stream_of(x)));
  return out;
}
#undef HE_OP
// ---- end linear ----

}  // namespace hybrid_engine
