// linear: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "linear"

namespace hybrid_engine {

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
