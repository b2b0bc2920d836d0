// token_logprobs on the CPU: log_softmax(hidden @ weight.T / T)[tokens] without ever holding the
// [N, V] logits. Both passes walk blocks of the vocabulary with all rows at once (GEMM into one
// reused buffer, then a fused pass over the block). The forward merges each row's running max /
// sum-exp / entropy sums across blocks; the backward recomputes a block's logits from the saved
// lse, turns them into their gradient in place, and makes that block's weight gradient in one
// complete GEMM (no accumulation across blocks, which in bf16 would round many times), so only
// the smaller [N, H] gradient accumulates. The GEMMs are MKL / oneDNN through at::mm_out; the
// softmax math is fp32 with at::vec.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "token_logprobs"

// fp32, bf16 and fp16 only: HE_DISPATCH_FLOATING would also instantiate double, which at::vec's
// float conversions do not cover and check_inputs rejects anyway.
#define LOGPROBS_DISPATCH(dtype, name, ...)                                                      \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)               \
                                          AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace hybrid_engine {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kIgnoreIndex = -100;
// Logits elements per block: 32 MiB of fp32. Large enough for MKL to run the block's GEMM at full
// speed (2048 columns at N = 4096), small enough that peak extra memory stays a few tens of MiB.
constexpr int64_t kBlockElems = int64_t{1} << 23;
// Fewer vocabulary columns than this per block make the GEMM inefficient.
constexpr int64_t kMinBlockDim = 64;
// Elements per parallel task, so that a task amortises the thread hand-off.
constexpr int64_t kGrainElems = 1 << 15;

template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

template <typename T>
inline void store_f(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, Vec::size());
  }
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// Running softmax statistics of one row over the vocabulary blocks seen so far, in raw logits x
// (z = x * inv_t): mx = max x, s = sum e^u and t = sum e^u u with u = (x - mx) * inv_t, plus the
// target's raw logit. Centring on the max keeps every term <= 1 and lets the entropy,
// log(s) - t / s, come out without cancellation.
struct RowStats {
  float mx, s, t, x_tok;
};

// Folds one row segment x[0, n) (vocabulary [v0, v0 + n)) into st.
template <typename T>
void row_forward(const T* x, int64_t n, int64_t v0, float inv_t, int64_t tok, bool with_entropy, RowStats& st) {
  constexpr int64_t W = Vec::size();
  const int64_t nv = n - n % W;
  float mx = st.mx;
  if (nv > 0) {
    Vec vmax(mx);
    for (int64_t j = 0; j < nv; j += W) vmax = at::vec::maximum(vmax, load_f(x + j));
    mx = hmax(vmax);
  }
  for (int64_t j = nv; j < n; ++j) mx = std::max(mx, static_cast<float>(x[j]));
  if (mx > st.mx && st.s > 0.f) {
    // Re-centre the sums on the new max: e^u_old = e^d e^u_new and u_old = u_new - d.
    const float d = (st.mx - mx) * inv_t, scale = std::exp(d);
    st.t = scale * (st.t + d * st.s);
    st.s *= scale;
  }
  st.mx = mx;
  // u = (x - mx) * inv_t: subtracting first makes u exactly 0 at the max (x * inv_t - mx * inv_t
  // would not be), so a certain outcome gets logprob and entropy exactly 0.
  const Vec vscale(inv_t), vmx(mx);
  Vec vs(0.f), vt(0.f);
  for (int64_t j = 0; j < nv; j += W) {
    const Vec u = (load_f(x + j) - vmx) * vscale;
    const Vec e = u.exp();
    vs = vs + e;
    if (with_entropy) vt = at::vec::fmadd(e, u, vt);
  }
  float s = hsum(vs), t = with_entropy ? hsum(vt) : 0.f;
  for (int64_t j = nv; j < n; ++j) {
    const float u = (static_cast<float>(x[j]) - mx) * inv_t;
    const float e = std::exp(u);
    s += e;
    t += e * u;
  }
  st.s += s;
  st.t += t;
  if (tok >= v0 && tok < v0 + n) st.x_tok = static_cast<float>(x[tok - v0]);
}

// Overwrites one row segment of raw logits x[0, n) (vocabulary [v0, v0 + n)) with the gradient of
// the loss with respect to those raw logits. With z = x * inv_t, p = exp(z - lse), c = lse - H:
//   d logprob / dz_j = [j == tok] - p_j,   d H / dz_j = -p_j (z_j - c),
// and d/dx = inv_t * d/dz.
template <typename T>
void row_backward(T* x, int64_t n, float inv_t, float lse, float c, float g_lp, float g_ent, int64_t tok_in_block) {
  constexpr int64_t W = Vec::size();
  if (g_lp == 0.f && g_ent == 0.f) {
    std::fill(x, x + n, T(0.f));
    return;
  }
  const int64_t nv = n - n % W;
  // dx_j = -inv_t p_j (g_lp + g_ent (z_j - c)) = p_j (a + b (z_j - c)). z_j - lse and z_j - c are
  // each one FMA of x_j, rounded once: they are small differences of logit-sized numbers.
  const float a = -inv_t * g_lp, b = -inv_t * g_ent;
  const auto grad = [&](float xj) { return std::exp(std::fma(xj, inv_t, -lse)) * (a + b * std::fma(xj, inv_t, -c)); };
  const bool has_tok = tok_in_block >= 0 && tok_in_block < n;
  const float x_tok = has_tok ? static_cast<float>(x[tok_in_block]) : 0.f;  // read before overwritten
  const Vec vscale(inv_t), vneg_lse(-lse), vneg_c(-c), va(a), vb(b);
  for (int64_t j = 0; j < nv; j += W) {
    const Vec xj = load_f(x + j);
    const Vec p = at::vec::fmadd(xj, vscale, vneg_lse).exp();
    store_f(x + j, p * at::vec::fmadd(vb, at::vec::fmadd(xj, vscale, vneg_c), va));
  }
  for (int64_t j = nv; j < n; ++j) x[j] = static_cast<T>(grad(static_cast<float>(x[j])));
  // The target's one-hot term, added in fp32 so that a bf16 result is rounded once.
  if (has_tok) x[tok_in_block] = static_cast<T>(grad(x_tok) + inv_t * g_lp);
}

void check_tokens(const at::Tensor& tokens, int64_t V) {
  const int64_t* t = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    HE_CHECK(t[i] == kIgnoreIndex || (t[i] >= 0 && t[i] < V), "tokens[", i, "] = ", t[i], " is out of range [0, ", V,
             ") (use ", kIgnoreIndex, " to ignore a position)");
  }
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& tokens, double temperature) {
  CHECK_DIM(hidden, 2, "[N, H]");
  CHECK_DIM(weight, 2, "[V, H]");
  CHECK_SIZE(weight, 1, hidden.size(1));
  HE_CHECK(weight.size(0) > 0, "weight must have at least one row (V >= 1)");
  CHECK_SHAPE(tokens, hidden.size(0));
  CHECK_FLOATING(hidden);
  CHECK_SAME_DTYPE(weight, hidden);
  CHECK_DTYPE(tokens, at::kLong);
  CHECK_CPU(hidden);
  CHECK_CPU(weight);
  CHECK_CPU(tokens);
  HE_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// The ids of the rows where `keep` holds, or an undefined tensor when that is every row.
at::Tensor live_rows(const at::Tensor& keep) {
  const int64_t count = keep.sum().item<int64_t>();
  return count == keep.numel() ? at::Tensor() : keep.nonzero().view(-1);
}

// acc[k] += x[k] for k in [0, n), the sum in fp32.
template <typename T>
void add_to_float(float* acc, const T* x, int64_t n) {
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n / W, kGrainElems / W, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin * W; k < end * W; k += W) (Vec::loadu(acc + k) + load_f(x + k)).store(acc + k);
  });
  for (int64_t k = n - n % W; k < n; ++k) acc[k] += static_cast<float>(x[k]);
}

// A contiguous [rows, cols] view of the start of a flat block buffer.
at::Tensor block_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& tokens, double temperature,
                                                                  bool with_entropy) {
  check_inputs(hidden, weight, tokens, temperature);
  const auto tokens_c = tokens.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_tokens(tokens_c, V);
  const auto opts = hidden.options().dtype(at::kFloat);
  auto logprobs = at::zeros({N}, opts), entropy = at::zeros({N}, opts), lse = at::zeros({N}, opts);
  // Without entropy an ignored row's answer is known (logprob 0, no gradient), so only the other
  // rows go through the GEMM: prompt and padding tokens cost nothing. Their lse stays 0.
  const auto live = with_entropy ? at::Tensor() : live_rows(tokens_c.ne(kIgnoreIndex));
  const auto h = live.defined() ? hidden.index_select(0, live) : hidden;
  const auto tok = live.defined() ? tokens_c.index_select(0, live) : tokens_c;
  const int64_t M = h.size(0);
  if (M == 0) return {logprobs, entropy, lse};
  // Vocabulary blocks with all rows: [M, cols] logits per GEMM, the running statistics merged
  // across blocks. Against row blocks, the weight is read once and the GEMMs have M rows (MKL runs
  // them faster than one [N, V] GEMM, whose output alone is 4 N V bytes of fresh memory).
  const int64_t cols_per_block = std::min(V, std::max(kMinBlockDim, kBlockElems / M));
  const auto buffer = at::empty({M * cols_per_block}, hidden.options());
  std::vector<RowStats> stats(M, RowStats{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f});
  const float inv_t = static_cast<float>(1.0 / temperature);
  LOGPROBS_DISPATCH(hidden.scalar_type(), "token_logprobs_cpu", [&] {
    const int64_t* tp = tok.data_ptr<int64_t>();
    for (int64_t v0 = 0; v0 < V; v0 += cols_per_block) {
      const int64_t cols = std::min(cols_per_block, V - v0);
      auto logits = block_view(buffer, M, cols);  // [M, cols], raw (unscaled)
      at::mm_out(logits, h, weight.narrow(0, v0, cols).t());
      const scalar_t* xp = logits.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          row_forward<scalar_t>(xp + i * cols, cols, v0, inv_t, tp[i], with_entropy, stats[i]);
        }
      });
    }
  });
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t* ids = live.defined() ? live.data_ptr<int64_t>() : nullptr;
  float *lp = logprobs.data_ptr<float>(), *ent = entropy.data_ptr<float>(), *ls = lse.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const RowStats& st = stats[r];
    const int64_t i = ids ? ids[r] : r;
    const float log_s = std::log(st.s);
    ls[i] = st.mx * inv_t + log_s;
    lp[i] = tp[r] == kIgnoreIndex ? 0.f : (st.x_tok - st.mx) * inv_t - log_s;
    if (with_entropy) ent[i] = log_s - st.t / st.s;
  }
  return {logprobs, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                                               const std::optional<at::Tensor>& grad_entropy_opt,
                                                               const at::Tensor& hidden, const at::Tensor& weight,
                                                               const at::Tensor& tokens, const at::Tensor& lse,
                                                               const at::Tensor& entropy, double temperature) {
  check_inputs(hidden, weight, tokens, temperature);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  CHECK_SHAPE(grad_logprobs, N);
  CHECK_SHAPE(lse, N);
  CHECK_SHAPE(entropy, N);
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_DTYPE(entropy, at::kFloat);
  CHECK_CPU(grad_logprobs);
  CHECK_CPU(lse);
  CHECK_CPU(entropy);
  const bool has_grad_entropy = grad_entropy_opt.has_value() && grad_entropy_opt->defined();
  const at::Tensor grad_entropy = has_grad_entropy ? *grad_entropy_opt : at::Tensor();
  if (has_grad_entropy) {
    CHECK_SHAPE(grad_entropy, N);
    CHECK_CPU(grad_entropy);
  }
  check_tokens(tokens.contiguous(), V);
  // Rows with a zero gradient (ignored token or zero grad_logprobs, and no entropy gradient) add
  // nothing to either gradient: only the M others go through the three GEMMs.
  auto keep = tokens.ne(kIgnoreIndex).logical_and(grad_logprobs.ne(0));
  if (has_grad_entropy) keep = keep.logical_or(grad_entropy.ne(0));
  const auto live = live_rows(keep);
  const auto pick = [&](const at::Tensor& t) { return (live.defined() ? t.index_select(0, live) : t).contiguous(); };
  const auto h = pick(hidden), tok = pick(tokens), g_lp = pick(grad_logprobs.to(at::kFloat)), ls = pick(lse);
  const auto ent = pick(entropy), g_ent = has_grad_entropy ? pick(grad_entropy.to(at::kFloat)) : at::Tensor();
  const int64_t M = h.size(0);

  const bool fp32 = hidden.scalar_type() == at::kFloat;
  auto grad_weight = M == 0 ? at::zeros({V, H}, weight.options()) : at::empty({V, H}, weight.options());
  // fp32 accumulates grad_hidden in place; bf16/fp16 accumulate in an fp32 copy (rounding once at
  // the end) from each block's product in `partial`.
  auto grad_h = at::zeros({M, H}, hidden.options().dtype(at::kFloat));
  auto partial = fp32 ? at::Tensor() : at::empty({M, H}, hidden.options());
  const int64_t cols_per_block = M == 0 ? V : std::min(V, std::max(kMinBlockDim, kBlockElems / M));
  const auto buffer = at::empty({M * cols_per_block}, hidden.options());
  // oneDNN runs a bf16/fp16 GEMM with a transposed left operand at about half speed; copying the
  // block's gradient to [cols, M] first costs much less (MKL's fp32 GEMM needs no such copy).
  const auto buffer_t = fp32 ? at::Tensor() : at::empty({M * cols_per_block}, hidden.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  LOGPROBS_DISPATCH(hidden.scalar_type(), "token_logprobs_backward_cpu", [&] {
    const int64_t* tp = tok.data_ptr<int64_t>();
    const float *glp = g_lp.data_ptr<float>(), *gent = has_grad_entropy ? g_ent.data_ptr<float>() : nullptr;
    const float *lsp = ls.data_ptr<float>(), *entp = ent.data_ptr<float>();
    for (int64_t v0 = 0; M > 0 && v0 < V; v0 += cols_per_block) {
      const int64_t cols = std::min(cols_per_block, V - v0);
      const auto w_block = weight.narrow(0, v0, cols);  // [cols, H]
      auto logits = block_view(buffer, M, cols);        // [M, cols]: raw logits, then their gradient
      at::mm_out(logits, h, w_block.t());
      scalar_t* xp = logits.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const bool ignored = tp[i] == kIgnoreIndex;
          const float ge = gent ? gent[i] : 0.f;
          row_backward<scalar_t>(xp + i * cols, cols, inv_t, lsp[i], lsp[i] - entp[i], ignored ? 0.f : glp[i], ge,
                                 ignored ? -1 : tp[i] - v0);
        }
      });
      auto grad_weight_block = grad_weight.narrow(0, v0, cols);
      at::mm_out(grad_weight_block, fp32 ? logits.t() : block_view(buffer_t, cols, M).copy_(logits.t()), h);
      if (fp32) {
        grad_h.addmm_(logits, w_block);
      } else {
        at::mm_out(partial, logits, w_block);
        add_to_float(grad_h.data_ptr<float>(), partial.data_ptr<scalar_t>(), M * H);
      }
    }
  });
  if (!live.defined()) return {grad_h.to(hidden.scalar_type()), grad_weight};
  return {at::zeros({N, H}, hidden.options()).index_copy_(0, live, grad_h.to(hidden.scalar_type())), grad_weight};
}

}  // namespace hybrid_engine
