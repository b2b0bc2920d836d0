// attention: CPU kernels. Placeholder until implemented.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "attention"

namespace hybrid_engine {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seq_lens, double scale) {
  HE_CHECK(false, "not implemented yet");
}

at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& seq_lens, double scale) {
  HE_CHECK(false, "not implemented yet");
}

}  // namespace hybrid_engine
