// norm: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "norm"

namespace hybrid_engine {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  HE_CHECK(false, "not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                     const at::Tensor& weight, double eps) {
  HE_CHECK(false, "not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
