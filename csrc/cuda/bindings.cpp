// The thin layer between torch and the torch-free CUDA kernels: argument checks, output
// allocation, raw pointers and the current stream. Compiled only into CUDA builds of the extension
// (HYBRID_ENGINE_CUDA); the kernels themselves live in csrc/cuda/<family>.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cuda/gae.h"
#include "hybrid_engine/cuda/logprobs.h"
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
#define HE_OP "token_logprobs"
namespace {
constexpr int64_t kLogprobsIgnoreIndex = -100;
// Logits elements per block: 64 MiB of fp32, >= 512 rows at V = 32000, enough to keep cuBLAS at full
// speed while the [N, V] logits never exist.
constexpr int64_t kLogprobsBlockElems = int64_t{1} << 24;
constexpr int64_t kLogprobsMinBlockDim = 128;

void logprobs_check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& tokens,
                           double temperature) {
  CHECK_DIM(hidden, 2, "[N, H]");
  CHECK_DIM(weight, 2, "[V, H]");
  CHECK_SIZE(weight, 1, hidden.size(1));
  HE_CHECK(weight.size(0) > 0, "weight must have at least one row (V >= 1)");
  CHECK_SHAPE(tokens, hidden.size(0));
  CHECK_FLOATING(hidden);
  CHECK_SAME_DTYPE(weight, hidden);
  CHECK_DTYPE(tokens, at::kLong);
  CHECK_CUDA(hidden);
  CHECK_DEVICE(weight, hidden.device());
  CHECK_DEVICE(tokens, hidden.device());
  HE_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// One device-to-host sync per call buys an error that names the bad position instead of a read
// out of bounds in the kernel.
void logprobs_check_tokens(const at::Tensor& tokens, int64_t V) {
  const auto bad = tokens.ne(kLogprobsIgnoreIndex).logical_and(tokens.lt(0).logical_or(tokens.ge(V)));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  HE_CHECK(false, "tokens[", i, "] = ", tokens[i].item<int64_t>(), " is out of range [0, ", V, ") (use ",
           kLogprobsIgnoreIndex, " to ignore a position)");
}

// Calls f with a value of the CUDA element type of `dtype`.
template <typename F>
void logprobs_dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: HE_CHECK(false, "unsupported dtype ", dtype);
  }
}

at::Tensor logprobs_block(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& tokens, double temperature,
                                                                   bool with_entropy) {
  logprobs_check_inputs(hidden, weight, tokens, temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto tok = tokens.contiguous();
  logprobs_check_tokens(tok, V);
  const auto opts = hidden.options().dtype(at::kFloat);
  auto logprobs = at::empty({N}, opts), entropy = at::zeros({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logprobs, entropy, lse};
  const int64_t rows_per_block = std::min(N, std::max(kLogprobsMinBlockDim, kLogprobsBlockElems / V));
  const auto buffer = at::empty({rows_per_block * V}, hidden.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    auto logits = logprobs_block(buffer, rows, V);
    at::mm_out(logits, hidden.narrow(0, r0, rows), weight.t());
    logprobs_dispatch(hidden.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      HE_CUDA_CHECK(cuda::token_logprobs_rows(reinterpret_cast<const T*>(logits.data_ptr()),
                                              tok.data_ptr<int64_t>() + r0, logprobs.data_ptr<float>() + r0,
                                              entropy.data_ptr<float>() + r0, lse.data_ptr<float>() + r0, rows, V,
                                              inv_t, with_entropy, stream_of(hidden)));
    });
  }
  return {logprobs, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                                                const std::optional<at::Tensor>& grad_entropy_opt,
                                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                                const at::Tensor& tokens, const at::Tensor& lse,
                                                                const at::Tensor& entropy, double temperature) {
  logprobs_check_inputs(hidden, weight, tokens, temperature);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  CHECK_SHAPE(grad_logprobs, N);
  CHECK_SHAPE(lse, N);
  CHECK_SHAPE(entropy, N);
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_DTYPE(entropy, at::kFloat);
  CHECK_DEVICE(grad_logprobs, hidden.device());
  CHECK_DEVICE(lse, hidden.device());
  CHECK_DEVICE(entropy, hidden.device());
  const bool has_grad_entropy = grad_entropy_opt.has_value() && grad_entropy_opt->defined();
  const at::Tensor grad_entropy = has_grad_entropy ? *grad_entropy_opt : at::Tensor();
  if (has_grad_entropy) {
    CHECK_SHAPE(grad_entropy, N);
    CHECK_DEVICE(grad_entropy, hidden.device());
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto tok = tokens.contiguous();
  logprobs_check_tokens(tok, V);
  const auto g_lp = grad_logprobs.to(at::kFloat).contiguous(), ls = lse.contiguous(), ent = entropy.contiguous();
  const auto g_ent = has_grad_entropy ? grad_entropy.to(at::kFloat).contiguous() : at::Tensor();
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  // As on the CPU: vocabulary blocks, each block's grad_weight one complete GEMM, grad_hidden
  // accumulated in fp32 (in place for fp32 inputs, through `partial` otherwise).
  auto grad_weight = at::empty({V, H}, weight.options());
  auto grad_hidden = at::zeros({N, H}, hidden.options().dtype(at::kFloat));
  auto partial = fp32 ? at::Tensor() : at::empty({N, H}, hidden.options());
  if (N == 0) return {grad_hidden.to(hidden.scalar_type()), grad_weight.zero_()};
  const int64_t cols_per_block = std::min(V, std::max(kLogprobsMinBlockDim, kLogprobsBlockElems / N));
  const auto buffer = at::empty({N * cols_per_block}, hidden.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < V; v0 += cols_per_block) {
    const int64_t cols = std::min(cols_per_block, V - v0);
    const auto w_block = weight.narrow(0, v0, cols);
    auto logits = logprobs_block(buffer, N, cols);
    at::mm_out(logits, hidden, w_block.t());
    logprobs_dispatch(hidden.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      HE_CUDA_CHECK(cuda::token_logprobs_grad_logits(
          reinterpret_cast<T*>(logits.data_ptr()), tok.data_ptr<int64_t>(), g_lp.data_ptr<float>(),
          has_grad_entropy ? g_ent.data_ptr<float>() : nullptr, ls.data_ptr<float>(), ent.data_ptr<float>(), N, cols,
          v0, inv_t, stream_of(hidden)));
    });
    auto grad_weight_block = grad_weight.narrow(0, v0, cols);
    at::mm_out(grad_weight_block, logits.t(), hidden);
    if (fp32) {
      grad_hidden.addmm_(logits, w_block);
    } else {
      at::mm_out(partial, logits, w_block);
      grad_hidden.add_(partial);
    }
  }
  return {fp32 ? grad_hidden : grad_hidden.to(hidden.scalar_type()), grad_weight};
}
#undef HE_OP
// ---- end logprobs ----


// ---- reshard ----
// ---- end reshard ----


// ---- linear ----
// ---- end linear ----

}  // namespace hybrid_engine
