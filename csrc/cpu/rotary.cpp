// rotary: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "rotary"

namespace hybrid_engine {

void rotary_append_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
