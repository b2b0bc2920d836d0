// logprobs: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "logprobs"

namespace hybrid_engine {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& tokens, double temperature,
                                                                  bool with_entropy) {
  HE_CHECK(false, "not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                                               const std::optional<at::Tensor>& grad_entropy,
                                                               const at::Tensor& hidden, const at::Tensor& weight,
                                                               const at::Tensor& tokens, const at::Tensor& lse,
                                                               const at::Tensor& entropy, double temperature) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
