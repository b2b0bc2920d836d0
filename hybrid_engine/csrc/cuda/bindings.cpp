// The thin layer between torch and the torch-free CUDA kernels: argument checks, output
// allocation, raw pointers and the current stream. Compiled only into CUDA builds of the extension
// (HYBRID_ENGINE_CUDA); the kernels themselves live in hybrid_engine/csrc/cuda/<family>.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/cuda/gae.h"
#include "hybrid_engine/cuda/reshard.h"
#include "hybrid_engine/cuda/attention.h"
#include "hybrid_engine/cuda/rotary.h"
#include "hybrid_engine/cuda/norm.h"
#include "hybrid_engine/cuda/linear.h"
#include "hybrid_engine/cuda/logprobs.h"
#include "hybrid_engine/cuda/moe.h"
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
namespace {
cuda::AttentionDtype attention_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return cuda::AttentionDtype::kBFloat16;
    case at::kHalf: return cuda::AttentionDtype::kFloat16;
    default: return cuda::AttentionDtype::kFloat32;
  }
}
cuda::Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
}  // namespace

// seq_lens values are not checked here: that would synchronise on every call. The kernels clamp
// them to the valid range instead, so a bad length cannot read out of bounds.
#define HE_OP "decode_attention"
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens, double scale) {
  check_decode_attention_args(q, k_cache, v_cache, seq_lens);
  CHECK_CUDA(q);
  CHECK_SAME_DTYPE(k_cache, q);  // the CUDA kernel reads the cache in q's dtype (no bf16 cache under fp32 q yet)
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), T_max = k_cache.size(2);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({B, Hq, D}, q.options());
  HE_CUDA_CHECK(cuda::decode_attention(attention_dtype(q), q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(),
                                       v_cache.data_ptr(), lens.data_ptr<int64_t>(), out.data_ptr(), B, Hq, Hkv, T_max,
                                       D, static_cast<float>(scale), stream_of(q)));
  return out;
}
#undef HE_OP

#define HE_OP "prefill_attention"
at::Tensor prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seq_lens, double scale) {
  check_prefill_attention_args(q, k, v, seq_lens);
  CHECK_CUDA(q);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({B, Hq, T, D}, q.options());
  HE_CUDA_CHECK(cuda::prefill_attention(attention_dtype(q), q.data_ptr(), strides3(q), k.data_ptr(), strides3(k),
                                        v.data_ptr(), strides3(v), lens.data_ptr<int64_t>(), out.data_ptr(), B, Hq,
                                        Hkv, T, D, static_cast<float>(scale), stream_of(q)));
  return out;
}
#undef HE_OP
// ---- end attention ----


// ---- rotary ----
#define HE_OP "rotary_append_kv"
namespace {
// Calls f with a null pointer of the CUDA element type of `dtype` (fp32, fp16 or bf16) as a tag;
// the norm section below uses it too.
template <typename F>
void dispatch_cuda_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kHalf: return f(static_cast<__half*>(nullptr));
    case at::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, "expected float32, float16 or bfloat16, got ", dtype);
  }
}
}  // namespace

void rotary_append_kv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& positions,
                           const std::optional<at::Tensor>& cos_opt, const std::optional<at::Tensor>& sin_opt) {
  CHECK_DIM(q, 4, "[B, S, Hq, D]");
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3);
  CHECK_DIM(k, 4, "[B, S, Hkv, D]");
  const int64_t Hkv = k.size(2);
  CHECK_SHAPE(k, B, S, Hkv, D);
  CHECK_SHAPE(v, B, S, Hkv, D);
  CHECK_DIM(k_cache, 4, "[B, Hkv, T_max, D]");
  const int64_t T_max = k_cache.size(2);
  CHECK_SHAPE(k_cache, B, Hkv, T_max, D);
  CHECK_SHAPE(v_cache, B, Hkv, T_max, D);
  CHECK_SHAPE(positions, B, S);
  CHECK_FLOATING(q);
  CHECK_SAME_DTYPE(k, q);
  CHECK_SAME_DTYPE(v, q);
  CHECK_SAME_DTYPE(k_cache, q);
  CHECK_SAME_DTYPE(v_cache, q);
  CHECK_INDEX(positions);
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
  CHECK_CONTIGUOUS(k_cache);
  CHECK_CONTIGUOUS(v_cache);
  CHECK_CUDA(q);
  CHECK_DEVICE(k, q.device());
  CHECK_DEVICE(v, q.device());
  CHECK_DEVICE(k_cache, q.device());
  CHECK_DEVICE(v_cache, q.device());
  CHECK_DEVICE(positions, q.device());
  HE_CHECK(cos_opt.has_value() == sin_opt.has_value(), "cos and sin must be given together");
  at::Tensor cos, sin;
  int64_t P = 0, half = 0;
  if (cos_opt.has_value()) {
    cos = cos_opt->contiguous();
    sin = sin_opt->contiguous();
    CHECK_DIM(cos, 2, "[P, R/2]");
    P = cos.size(0);
    half = cos.size(1);
    HE_CHECK(half >= 1 && 2 * half <= D, "cos must have R/2 columns with 1 <= R/2 and R <= D = ", D, ", got shape ",
             shape_str(cos));
    CHECK_SHAPE(sin, P, half);
    CHECK_DTYPE(cos, at::kFloat);
    CHECK_DTYPE(sin, at::kFloat);
    CHECK_DEVICE(cos, q.device());
    CHECK_DEVICE(sin, q.device());
  }
  if (B * S == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto pos = positions.contiguous();
  // The bound check costs one device-to-host sync; the kernel itself never writes out of bounds.
  const int64_t p_max = pos.max().item<int64_t>();
  HE_CHECK(p_max < T_max, "positions must be < T_max = ", T_max, " (k_cache.size(2)), got ", p_max);
  HE_CHECK(!cos_opt.has_value() || p_max < P, "positions must be < P = ", P, " (rows of cos), got ", p_max);
  const cuda::RotaryShape shape{B,           S,           Hq,          Hkv,         D,           T_max,
                                P,           half,        q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                                k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
  dispatch_cuda_float(q.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    HE_DISPATCH_INDEX(pos.scalar_type(), "rotary_append_kv_cuda", [&] {
      HE_CUDA_CHECK(cuda::rotary_append_kv(
          static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()), static_cast<const T*>(v.data_ptr()),
          static_cast<T*>(k_cache.data_ptr()), static_cast<T*>(v_cache.data_ptr()), pos.data_ptr<index_t>(),
          cos.defined() ? cos.data_ptr<float>() : nullptr, sin.defined() ? sin.data_ptr<float>() : nullptr, shape,
          stream_of(q)));
    });
  });
}
#undef HE_OP
// ---- end rotary ----


// ---- norm ----
#define HE_OP "rms_norm"
namespace {
void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  HE_CHECK(x.dim() >= 1, "x must be at least 1-D [..., H], got shape ", shape_str(x));
  HE_CHECK(x.size(-1) > 0, "x must have a non-empty last dimension H, got shape ", shape_str(x));
  CHECK_FLOATING(x);
  CHECK_CUDA(x);
  CHECK_DIM(weight, 1, "[H]");
  CHECK_SIZE(weight, 0, x.size(-1));
  HE_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
           "weight must be float32 or x's dtype ", x.scalar_type(), ", got ", weight.scalar_type());
  CHECK_DEVICE(weight, x.device());
}

std::vector<int64_t> norm_rows(const at::Tensor& x) { return x.sizes().slice(0, x.dim() - 1).vec(); }

// Calls f with null pointers of x's and the weight's CUDA element types as tags.
template <typename F>
void dispatch_norm(const at::Tensor& x, const at::Tensor& weight, F&& f) {
  dispatch_cuda_float(x.scalar_type(), [&](auto* x_tag) {
    if (weight.scalar_type() == at::kFloat) {
      f(x_tag, static_cast<float*>(nullptr));
    } else {
      f(x_tag, x_tag);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor* residual,
                                                            const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(), w = weight.contiguous();
  const auto rc = residual != nullptr ? residual->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), xc.options());
  auto new_residual = residual != nullptr ? at::empty(x.sizes(), xc.options()) : at::Tensor();
  auto rstd = at::empty(norm_rows(x), xc.options().dtype(at::kFloat));
  const int64_t H = x.size(-1), N = x.numel() / H;
  dispatch_norm(xc, w, [&](auto* x_tag, auto* w_tag) {
    using T = std::remove_pointer_t<decltype(x_tag)>;
    using W = std::remove_pointer_t<decltype(w_tag)>;
    HE_CUDA_CHECK(cuda::rms_norm_forward(
        static_cast<const T*>(xc.data_ptr()), rc.defined() ? static_cast<const T*>(rc.data_ptr()) : nullptr,
        static_cast<const W*>(w.data_ptr()), static_cast<T*>(out.data_ptr()),
        new_residual.defined() ? static_cast<T*>(new_residual.data_ptr()) : nullptr, rstd.data_ptr<float>(), N, H,
        static_cast<float>(eps), stream_of(xc)));
  });
  return {out, new_residual, rstd};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  auto [out, new_residual, rstd] = norm_forward(x, nullptr, weight, eps);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  HE_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", shape_str(x), ", got ",
           shape_str(residual));
  CHECK_SAME_DTYPE(residual, x);
  CHECK_DEVICE(residual, x.device());
  return norm_forward(x, &residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd) {
  check_norm_args(x, weight);
  HE_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", shape_str(x), ", got ",
           shape_str(grad_out));
  CHECK_SAME_DTYPE(grad_out, x);
  CHECK_DEVICE(grad_out, x.device());
  HE_CHECK(rstd.sizes() == at::IntArrayRef(norm_rows(x)), "rstd must have shape ", at::IntArrayRef(norm_rows(x)),
           " (x's without H), got ", shape_str(rstd));
  CHECK_DTYPE(rstd, at::kFloat);
  CHECK_DEVICE(rstd, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto gc = grad_out.contiguous(), xc = x.contiguous(), rc = rstd.contiguous(), w = weight.contiguous();
  const int64_t H = x.size(-1), N = x.numel() / H;
  auto grad_x = at::empty(x.sizes(), xc.options());
  auto grad_weight = at::empty({H}, w.options());
  auto workspace = at::empty({cuda::rms_norm_backward_blocks(N), H}, xc.options().dtype(at::kFloat));
  dispatch_norm(xc, w, [&](auto* x_tag, auto* w_tag) {
    using T = std::remove_pointer_t<decltype(x_tag)>;
    using W = std::remove_pointer_t<decltype(w_tag)>;
    HE_CUDA_CHECK(cuda::rms_norm_backward(
        static_cast<const T*>(gc.data_ptr()), static_cast<const T*>(xc.data_ptr()),
        static_cast<const W*>(w.data_ptr()), rc.data_ptr<float>(), static_cast<T*>(grad_x.data_ptr()),
        static_cast<W*>(grad_weight.data_ptr()), workspace.data_ptr<float>(), N, H, stream_of(xc)));
  });
  return {grad_x, grad_weight};
}
#undef HE_OP
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
// Defined in hybrid_engine/csrc/cpu/reshard.cpp, which every build compiles: both devices reject the same calls.
int64_t check_reshard_gather_args(const at::Tensor& src, int64_t offset, int64_t row_stride,
                                  at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start,
                                  int64_t col_count);
int64_t check_reshard_scatter_args(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                                   at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start);

namespace {
// Byte offsets of each block's first row in the flat tensor (strided) and in the shard (dense).
void reshard_block_starts(int64_t elem_size, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                          at::IntArrayRef row_counts, int64_t col_start, int64_t col_count, std::vector<int64_t>& flat,
                          std::vector<int64_t>& shard) {
  int64_t row = 0;
  for (size_t k = 0; k < row_starts.size(); ++k) {
    flat.push_back((offset + row_starts[k] * row_stride + col_start) * elem_size);
    shard.push_back(row * col_count * elem_size);
    row += row_counts[k];
  }
}
}  // namespace

#define HE_OP "reshard_gather"
at::Tensor reshard_gather_cuda(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                               at::IntArrayRef row_counts, int64_t col_start, int64_t col_count) {
  CHECK_CUDA(src);
  const int64_t R = check_reshard_gather_args(src, offset, row_stride, row_starts, row_counts, col_start, col_count);
  const c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({R, col_count}, src.options());
  const int64_t es = src.element_size();
  std::vector<int64_t> flat, shard;
  reshard_block_starts(es, offset, row_stride, row_starts, row_counts, col_start, col_count, flat, shard);
  HE_CUDA_CHECK(cuda::reshard_copy(src.data_ptr(), out.data_ptr(), col_count * es, row_stride * es, col_count * es,
                                   flat.data(), shard.data(), row_counts.data(), row_counts.size(), stream_of(src)));
  return out;
}
#undef HE_OP

#define HE_OP "reshard_scatter"
void reshard_scatter_cuda(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                          at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start) {
  CHECK_CUDA(dst);
  CHECK_DEVICE(shard, dst.device());
  check_reshard_scatter_args(dst, shard, offset, row_stride, row_starts, row_counts, col_start);
  const c10::cuda::CUDAGuard guard(dst.device());
  const auto s = shard.contiguous();
  const int64_t C = s.size(1), es = dst.element_size();
  std::vector<int64_t> flat, dense;
  reshard_block_starts(es, offset, row_stride, row_starts, row_counts, col_start, C, flat, dense);
  HE_CUDA_CHECK(cuda::reshard_copy(s.data_ptr(), dst.data_ptr(), C * es, C * es, row_stride * es, dense.data(),
                                   flat.data(), row_counts.data(), row_counts.size(), stream_of(dst)));
}
#undef HE_OP
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

// ---- moe ----
#define HE_OP "moe_experts"
namespace {
// out fp32 [A, N]: rows of x sorted by expert (offsets [E + 1]) times their expert's w [E, N, K].
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w) {
  const auto dtype = w.scalar_type() == at::kFloat      ? cuda::WeightDtype::kFloat32
                     : w.scalar_type() == at::kBFloat16 ? cuda::WeightDtype::kBFloat16
                                                        : cuda::WeightDtype::kFloat16;
  auto out = at::empty({x.size(0), w.size(1)}, x.options());
  HE_CUDA_CHECK(cuda::grouped_linear(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), w.data_ptr(), dtype,
                                     out.data_ptr<float>(), w.size(0), x.size(0), w.size(1), w.size(2),
                                     stream_of(x)));
  return out;
}
}  // namespace

at::Tensor moe_experts_cuda(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                            const at::Tensor& gate_up, const at::Tensor& down) {
  check_moe_experts_args(x, expert_ids, routing_weights, gate_up, down);
  CHECK_CUDA(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, k = expert_ids.size(1);
  const auto flat = expert_ids.reshape({-1});
  // assignments by ascending expert (stable: tokens in order within one); std::optional: a plain bool would pick
  // the sort(dim, descending) overload
  const auto order = std::get<1>(flat.sort(std::optional<bool>(true), /*dim=*/0));
  const auto offsets = at::pad(at::cumsum(at::bincount(flat, {}, E), 0), {1, 0});
  const auto token = order.div(k, "floor");
  const auto h = grouped_linear(x.index_select(0, token).contiguous(), offsets, gate_up.contiguous());  // [A, 2I]
  const auto act = (at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I)).contiguous();
  const auto y = grouped_linear(act, offsets, down.contiguous());  // [A, H]
  const auto w = routing_weights.to(at::kFloat).reshape({-1}).index_select(0, order).unsqueeze(1);
  return at::zeros_like(x).index_add_(0, token, y * w);
}
#undef HE_OP
// ---- end moe ----

}  // namespace hybrid_engine
