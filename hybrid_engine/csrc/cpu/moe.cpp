// The expert MLPs of a Mixture-of-Experts layer on the CPU (moe_experts): the (token, slot) assignments are grouped
// by expert, and each selected expert runs once over all its tokens: its gate|up and down matrices are streamed
// once by decode_linear's kernel (a GEMM over the expert's rows), never once per token; experts no token chose
// are not read. The weighted outputs are added in ascending expert order, as Hugging Face's loop adds them.
#include <ATen/ATen.h>

#include <vector>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "moe_experts"

namespace hybrid_engine {

void check_moe_experts_args(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                            const at::Tensor& gate_up, const at::Tensor& down) {
  CHECK_DIM(x, 2, "[M, H]");
  CHECK_DTYPE(x, at::kFloat);
  CHECK_DIM(expert_ids, 2, "[M, k]");
  CHECK_DTYPE(expert_ids, at::kLong);
  CHECK_SIZE(expert_ids, 0, x.size(0));
  CHECK_SHAPE(routing_weights, expert_ids.size(0), expert_ids.size(1));
  CHECK_DIM(gate_up, 3, "[E, 2I, H]");
  CHECK_SIZE(gate_up, 2, x.size(1));
  HE_CHECK(gate_up.size(1) % 2 == 0, "gate_up must hold gate and up rows [E, 2I, H], got ", shape_str(gate_up));
  CHECK_SHAPE(down, gate_up.size(0), x.size(1), gate_up.size(1) / 2);
  CHECK_FLOATING(gate_up);
  CHECK_SAME_DTYPE(down, gate_up);
  for (const at::Tensor* t : {&expert_ids, &routing_weights, &gate_up, &down}) CHECK_DEVICE(*t, x.device());
}

namespace {

// rows[e]: the tokens that chose expert e, in token order, and slots[e] the slot (0..k) of each choice.
void group(const at::Tensor& ids, int64_t E, std::vector<std::vector<int64_t>>& rows,
           std::vector<std::vector<int64_t>>& slots) {
  const int64_t M = ids.size(0), k = ids.size(1);
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = p[m * k + j];
      HE_CHECK(e >= 0 && e < E, "expert_ids must lie in [0, ", E, "), got ", e);
      rows[e].push_back(m);
      slots[e].push_back(j);
    }
  }
}

}  // namespace

at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                           const at::Tensor& gate_up, const at::Tensor& down) {
  check_moe_experts_args(x, expert_ids, routing_weights, gate_up, down);
  CHECK_CPU(x);
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  const auto xc = x.contiguous(), ids = expert_ids.contiguous();
  const auto w = routing_weights.to(at::kFloat).contiguous();
  const auto gu = gate_up.contiguous(), dn = down.contiguous();
  std::vector<std::vector<int64_t>> rows(E), slots(E);
  group(ids, E, rows, slots);
  auto out = at::zeros_like(xc);
  const auto opts = ids.options();
  for (int64_t e = 0; e < E; ++e) {
    if (rows[e].empty()) continue;
    const auto token = at::tensor(rows[e], opts);  // [n]
    const auto slot = at::tensor(slots[e], opts);
    const auto h = decode_linear_cpu(xc.index_select(0, token), gu.select(0, e), std::nullopt);  // [n, 2I]
    const auto act = at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I);                          // [n, I]
    const auto y = decode_linear_cpu(act, dn.select(0, e), std::nullopt);                      // [n, H]
    out.index_add_(0, token, y * w.index({token, slot}).unsqueeze(1));
  }
  return out;
}

}  // namespace hybrid_engine
