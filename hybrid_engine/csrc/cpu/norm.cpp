// RMSNorm on the CPU with Hugging Face LlamaRMSNorm semantics, computed in fp32 and rounded once:
// the forward, the decoder layer's fused residual add + norm, and the backward. Rows run in
// parallel; each row is a few vectorised passes over data that stays in L1 between passes.
#include <ATen/Parallel.h>

#include <cmath>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cpu/vec_io.h"
#include "hybrid_engine/ops.h"

#define HE_OP "rms_norm"

namespace hybrid_engine {
namespace {

using vec_io::fVec;
using vec_io::kWidth;

// Rows per parallel task: enough elements that a task outweighs waking a thread, so decode-sized
// calls stay on one thread.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 32768 / H); }

float reduce_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

template <typename T>
float sum_squares(const T* x, int64_t H) {
  // Two accumulators halve the FMA dependency chain.
  fVec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * kWidth <= H; j += 2 * kWidth) {
    const fVec a = vec_io::load(x + j), b = vec_io::load(x + j + kWidth);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  for (; j < H; j += kWidth) {
    const fVec a = vec_io::load(x + j, std::min(kWidth, H - j));
    acc0 = at::vec::fmadd(a, a, acc0);
  }
  return reduce_sum(acc0 + acc1);
}

// out = x * rstd * w, rounded once to T.
template <typename T>
void scale_row(const T* x, const float* w, T* out, float rstd, int64_t H) {
  const fVec r(rstd);
  for (int64_t j = 0; j < H; j += kWidth) {
    const int64_t n = std::min(kWidth, H - j);
    vec_io::store(out + j, vec_io::load(x + j, n) * r * vec_io::load(w + j, n), n);
  }
}

template <typename T>
void add_row(const T* x, const T* residual, T* sum, int64_t H) {
  for (int64_t j = 0; j < H; j += kWidth) {
    const int64_t n = std::min(kWidth, H - j);
    vec_io::store(sum + j, vec_io::load(x + j, n) + vec_io::load(residual + j, n), n);
  }
}

// Normalises rows [begin, end) of x into out. With a residual, x + residual is first rounded to T
// and stored in new_residual, and the norm is taken of that stored value, as HF's decoder layer does.
template <typename T>
void forward_rows(const T* x, const T* residual, T* new_residual, const float* w, T* out, float* rstd, int64_t begin,
                  int64_t end, int64_t H, float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const T* row = x + i * H;
    if (residual != nullptr) {
      add_row(row, residual + i * H, new_residual + i * H, H);
      row = new_residual + i * H;
    }
    const float r = 1.f / std::sqrt(sum_squares(row, H) / static_cast<float>(H) + eps);
    rstd[i] = r;
    scale_row(row, w, out + i * H, r, H);
  }
}

// With xhat = x * rstd and y = w * xhat:
//   grad_x = rstd * (g * w - xhat * mean(g * w * xhat)) = rstd * g * w - (rstd^3 * sum(g * w * x) / H) * x
//   grad_w += g * xhat, accumulated in the caller's fp32 partial row.
template <typename T>
void backward_rows(const T* g, const T* x, const float* w, const float* rstd, T* gx, float* gw, int64_t begin,
                   int64_t end, int64_t H) {
  for (int64_t i = begin; i < end; ++i) {
    const T *gi = g + i * H, *xi = x + i * H;
    T* gxi = gx + i * H;
    fVec acc(0.f);
    for (int64_t j = 0; j < H; j += kWidth) {
      const int64_t n = std::min(kWidth, H - j);
      acc = at::vec::fmadd(vec_io::load(gi + j, n) * vec_io::load(w + j, n), vec_io::load(xi + j, n), acc);
    }
    const float r = rstd[i];
    const fVec a(r), b(r * r * r * reduce_sum(acc) / static_cast<float>(H));
    for (int64_t j = 0; j < H; j += kWidth) {
      const int64_t n = std::min(kWidth, H - j);
      const fVec gv = vec_io::load(gi + j, n), xv = vec_io::load(xi + j, n), wv = vec_io::load(w + j, n);
      vec_io::store(gxi + j, a * gv * wv - b * xv, n);
      vec_io::store(gw + j, at::vec::fmadd(gv * xv, a, vec_io::load(gw + j, n)), n);
    }
  }
}

void check_x_weight(const at::Tensor& x, const at::Tensor& weight) {
  HE_CHECK(x.dim() >= 1, "x must be at least 1-D [..., H], got shape ", shape_str(x));
  HE_CHECK(x.size(-1) > 0, "x must have a non-empty last dimension H, got shape ", shape_str(x));
  CHECK_FLOATING(x);
  CHECK_CPU(x);
  CHECK_DIM(weight, 1, "[H]");
  CHECK_SIZE(weight, 0, x.size(-1));
  HE_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
           "weight must be float32 or x's dtype ", x.scalar_type(), ", got ", weight.scalar_type());
  CHECK_CPU(weight);
}

// The norm statistics' shape: x's shape without the last dimension.
std::vector<int64_t> row_shape(const at::Tensor& x) { return x.sizes().slice(0, x.dim() - 1).vec(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                       const at::Tensor& weight, double eps) {
  const auto xc = x.contiguous();
  // The weight is tiny next to x: one fp32 copy keeps the inner loops free of conversions.
  const auto w = weight.to(at::kFloat).contiguous();
  const auto rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), xc.options());
  auto new_residual = residual.has_value() ? at::empty(x.sizes(), xc.options()) : at::Tensor();
  auto rstd = at::empty(row_shape(x), xc.options().dtype(at::kFloat));
  const int64_t H = x.size(-1), N = x.numel() / H;
  HE_DISPATCH_STORAGE(x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* rp = residual.has_value() ? rc.data_ptr<scalar_t>() : nullptr;
    scalar_t* np = residual.has_value() ? new_residual.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(xc.data_ptr<scalar_t>(), rp, np, w.data_ptr<float>(), out.data_ptr<scalar_t>(),
                             rstd.data_ptr<float>(), begin, end, H, static_cast<float>(eps));
    });
  });
  return {out, new_residual, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_x_weight(x, weight);
  auto [out, new_residual, rstd] = forward(x, std::nullopt, weight, eps);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                     const at::Tensor& weight, double eps) {
  check_x_weight(x, weight);
  HE_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", shape_str(x), ", got ",
           shape_str(residual));
  CHECK_SAME_DTYPE(residual, x);
  CHECK_CPU(residual);
  return forward(x, residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd) {
  check_x_weight(x, weight);
  HE_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", shape_str(x), ", got ",
           shape_str(grad_out));
  CHECK_SAME_DTYPE(grad_out, x);
  CHECK_CPU(grad_out);
  HE_CHECK(rstd.sizes() == at::IntArrayRef(row_shape(x)), "rstd must have shape ", at::IntArrayRef(row_shape(x)),
           " (x's without H), got ", shape_str(rstd));
  CHECK_DTYPE(rstd, at::kFloat);
  CHECK_CPU(rstd);
  const auto gc = grad_out.contiguous(), xc = x.contiguous(), rc = rstd.contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t H = x.size(-1), N = x.numel() / H;
  auto grad_x = at::empty(x.sizes(), xc.options());
  // grad_weight sums over all rows: each chunk of rows accumulates its own fp32 partial row, and
  // the partials are added at the end, so no two threads write the same memory.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), at::divup(N, row_grain(H))));
  auto partial = at::zeros({chunks, H}, xc.options().dtype(at::kFloat));
  HE_DISPATCH_STORAGE(x.scalar_type(), "rms_norm_backward_cpu", [&] {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        backward_rows<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w.data_ptr<float>(),
                                rc.data_ptr<float>(), grad_x.data_ptr<scalar_t>(), partial.data_ptr<float>() + c * H,
                                c * N / chunks, (c + 1) * N / chunks, H);
      }
    });
  });
  return {grad_x, partial.sum(0).to(weight.scalar_type())};
}

}  // namespace hybrid_engine
