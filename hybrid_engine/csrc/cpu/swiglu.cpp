// The gated MLP's activation on the CPU, for training: out = silu(gate) * up (Llama's SwiGLU, HF's
// act_fn(gate_proj(x)) * up_proj(x)) and its backward, each one pass over the rows in fp32, rounded once
// to the inputs' dtype. Eager PyTorch takes two passes and an intermediate tensor forward, and four
// passes backward (silu's backward, two products, and the saved silu).
#include <ATen/Parallel.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cpu/vec_io.h"
#include "hybrid_engine/ops.h"

#define HE_OP "silu_mul"

namespace hybrid_engine {
namespace {

using vec_io::fVec;
using vec_io::kWidth;

// Elements per parallel task: enough that a task outweighs waking a thread.
constexpr int64_t kGrain = 32768;

inline fVec sigmoid(const fVec& g) { return fVec(1.f) / (fVec(1.f) + g.neg().exp()); }

void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  CHECK_FLOATING(gate);
  CHECK_SAME_DTYPE(up, gate);
  HE_CHECK(up.sizes() == gate.sizes(), "up must have gate's shape ", shape_str(gate), ", got ", shape_str(up));
  CHECK_CPU(gate);
  CHECK_CPU(up);
}

// Runs f(begin, end) over [0, n) in parallel, in chunks of whole vectors.
template <typename F>
void for_chunks(int64_t n, const F& f) {
  at::parallel_for(0, (n + kWidth - 1) / kWidth, kGrain / kWidth, [&](int64_t b, int64_t e) {
    f(b * kWidth, std::min(n, e * kWidth));
  });
}

}  // namespace

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up);
  const auto g = gate.contiguous(), u = up.contiguous();
  auto out = at::empty_like(g);
  HE_DISPATCH_STORAGE(g.scalar_type(), HE_OP, [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *up_ = u.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_chunks(g.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += kWidth) {
        const int64_t n = std::min(kWidth, end - i);
        const fVec gv = vec_io::load(gp + i, n);
        vec_io::store(op + i, gv * sigmoid(gv) * vec_io::load(up_ + i, n), n);
      }
    });
  });
  return out;
}

// d gate = grad * up * s * (1 + gate * (1 - s)), d up = grad * gate * s, with s = sigmoid(gate).
std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                         const at::Tensor& up) {
  check_pair(gate, up);
  CHECK_SAME_DTYPE(grad, gate);
  HE_CHECK(grad.sizes() == gate.sizes(), "grad must have gate's shape ", shape_str(gate), ", got ", shape_str(grad));
  const auto dy = grad.contiguous(), g = gate.contiguous(), u = up.contiguous();
  auto d_gate = at::empty_like(g), d_up = at::empty_like(g);
  HE_DISPATCH_STORAGE(g.scalar_type(), "silu_mul_backward", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *up_ = u.data_ptr<scalar_t>();
    scalar_t *dgp = d_gate.data_ptr<scalar_t>(), *dup = d_up.data_ptr<scalar_t>();
    for_chunks(g.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += kWidth) {
        const int64_t n = std::min(kWidth, end - i);
        const fVec gv = vec_io::load(gp + i, n), uv = vec_io::load(up_ + i, n), dv = vec_io::load(dyp + i, n);
        const fVec s = sigmoid(gv), silu = gv * s;
        vec_io::store(dup + i, dv * silu, n);
        vec_io::store(dgp + i, dv * uv * s * (fVec(1.f) + gv * (fVec(1.f) - s)), n);
      }
    });
  });
  return {d_gate, d_up};
}

}  // namespace hybrid_engine
