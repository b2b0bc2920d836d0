// One decode step of a whole decoder-only transformer on the CPU: the per-layer loop runs here in
// C++, calling the op kernels directly, so a step pays no Python or dispatcher overhead per layer
// (on a 125M model that overhead is a large fraction of a bf16 step). The Python loop in
// hybrid_engine/model/transformer.py is its reference and must compute the same thing.
#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#include <vector>

#define HE_OP "decode_step"

namespace hybrid_engine {
namespace {

// Slots per layer in the flat weight list, in this order (undefined where a model has none).
enum Slot {
  kAttnNormW, kAttnNormB, kQkvW, kQkvB, kOW, kOB, kMlpNormW, kMlpNormB, kUpW, kUpB, kDownW, kDownB,
  kQNormW, kKNormW,  // the q/k RMSNorm weights: Qwen3 [D] per head, OLMo 2 [heads * D]
  kAttnOutNormW, kMlpOutNormW,  // Gemma 3: norms of the sublayers' outputs, besides the pre-norms of slots 0 and 6
  kSlots
};
enum Activation { kSiluGated = 0, kRelu = 1, kGeluTanh = 2, kGelu = 3, kGeluTanhGated = 4 };
enum QkNorm { kNoQkNorm = 0, kPerHead = 1, kProjection = 2 };

std::optional<at::Tensor> opt(const c10::List<std::optional<at::Tensor>>& w, int64_t i) {
  std::optional<at::Tensor> t = w.get(i);
  return t.has_value() && t->defined() ? t : std::nullopt;
}

at::Tensor req(const c10::List<std::optional<at::Tensor>>& w, int64_t i) {
  auto t = opt(w, i);
  HE_CHECK(t.has_value(), "weights[", i, "] is required but missing");
  return *t;
}

}  // namespace

at::Tensor decode_step_cpu(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& weights,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
                           const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bool rms_norm,
                           int64_t activation, double eps, at::ArrayRef<double> scales, int64_t qk_norm,
                           bool post_norm, at::IntArrayRef nope_layers, const std::optional<at::Tensor>& local_cos,
                           const std::optional<at::Tensor>& local_sin, at::IntArrayRef local_layers,
                           bool bf16_activations) {
  CHECK_DIM(x, 2, "[B, H]");
  CHECK_DTYPE(x, at::kFloat);
  CHECK_DIM(k_cache, 5, "[L, B_max, Hkv, T_max, D]");
  CHECK_DTYPE(lengths, at::kInt);
  const int64_t B = x.size(0), L = k_cache.size(0);
  HE_CHECK(static_cast<int64_t>(weights.size()) == L * kSlots + 4, "weights must hold ", kSlots,
           " entries per layer plus 4 (final norm weight and bias, LM head weight and bias), got ", weights.size(),
           " for ", L, " layers");
  HE_CHECK(static_cast<int64_t>(scales.size()) == L, "scales must hold one scale per layer, got ", scales.size());
  CHECK_SHAPE(lengths, B);
  HE_CHECK(k_cache.size(1) >= B && k_cache.size(2) == num_kv_heads && k_cache.size(4) == head_dim,
           "k_cache must be [L, >= ", B, ", ", num_kv_heads, ", T_max, ", head_dim, "], got ", shape_str(k_cache));
  HE_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", shape_str(k_cache));
  HE_CHECK(activation >= kSiluGated && activation <= kGeluTanhGated, "activation must be 0..4, got ", activation);
  HE_CHECK(qk_norm >= kNoQkNorm && qk_norm <= kProjection, "qk_norm must be 0..2, got ", qk_norm);
  HE_CHECK(!post_norm || rms_norm, "post_norm needs rms_norm");
  std::vector<bool> rope(L, true);  // false: a NoPE layer (SmolLM3), whose k and v are appended unrotated
  for (const int64_t i : nope_layers) {
    HE_CHECK(i >= 0 && i < L, "nope_layers must name layers in [0, ", L, "), got ", i);
    rope[i] = false;
  }
  std::vector<bool> local(L, false);  // true: RoPE from local_cos, local_sin (Gemma 3's sliding layers)
  for (const int64_t i : local_layers) {
    HE_CHECK(i >= 0 && i < L, "local_layers must name layers in [0, ", L, "), got ", i);
    HE_CHECK(local_cos.has_value() && local_sin.has_value(), "local_layers need local_cos and local_sin");
    local[i] = true;
  }
  const std::optional<at::Tensor> none;

  const int64_t H = x.size(1);
  // Norm of `in` (plus residual when given): returns {normed, new residual}.
  auto norm = [&](const at::Tensor& in, const std::optional<at::Tensor>& residual, const at::Tensor& w,
                  const std::optional<at::Tensor>& b) -> std::pair<at::Tensor, at::Tensor> {
    if (rms_norm) {
      if (!residual) return {std::get<0>(rms_norm_cpu(in, w, eps)), in};
      auto [out, new_residual, rstd] = rms_norm_residual_cpu(in, *residual, w, eps);
      return {out, new_residual};
    }
    const at::Tensor sum = residual ? in + *residual : in;
    return {at::layer_norm(sum, {H}, w, b, eps), sum};
  };
  // A sublayer's input from the last sublayer's output and the residual stream: {input, new residual}. Pre-norm:
  // the norm of their sum; post-norm (OLMo 2): the sum itself, the output having been normed by `leave`.
  auto enter = [&](const at::Tensor& in, const std::optional<at::Tensor>& residual, int64_t base,
                   int64_t slot) -> std::pair<at::Tensor, at::Tensor> {
    if (!post_norm) return norm(in, residual, req(weights, base + slot), opt(weights, base + slot + 1));
    const at::Tensor sum = residual ? in + *residual : in;
    return {sum, sum};
  };
  // A sublayer's output as it joins the residual stream: normed by its pre-norm's slot under post-norm (OLMo 2), by
  // its output norm's slot where the block has one (Gemma 3), else as it is.
  auto leave = [&](const at::Tensor& out, int64_t base, int64_t slot, int64_t out_slot) {
    if (post_norm) return std::get<0>(rms_norm_cpu(out, req(weights, base + slot), eps));
    const auto w = opt(weights, base + out_slot);
    return w ? std::get<0>(rms_norm_cpu(out, *w, eps)) : out;
  };
  // q [B, 1, heads, D] normed before RoPE: per head (rows of D) or over the whole projection (rows of heads * D).
  auto norm_qk = [&](const at::Tensor& t, int64_t base, int64_t slot) {
    const at::Tensor& w = req(weights, base + slot);
    if (qk_norm == kPerHead) return std::get<0>(rms_norm_cpu(t, w, eps));
    return std::get<0>(rms_norm_cpu(t.reshape({B, -1}), w, eps)).view(t.sizes());
  };
  // A linear layer (weights slot, bias slot + 1): with bf16_activations decode_linear_bf16's (the fast mode).
  auto linear = [&](const at::Tensor& in, int64_t base, int64_t slot) {
    const at::Tensor& w = req(weights, base + slot);
    return bf16_activations ? decode_linear_bf16_cpu(in, w, opt(weights, base + slot + 1))
                            : decode_linear_cpu(in, w, opt(weights, base + slot + 1));
  };

  const at::Tensor positions = lengths.view({B, 1});
  const at::Tensor seq_lens = lengths + 1;
  at::Tensor hidden = x;
  std::optional<at::Tensor> residual;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t base = i * kSlots;
    auto [h, res] = enter(hidden, residual, base, kAttnNormW);
    const at::Tensor qkv = linear(h, base, kQkvW).view({B, 1, num_heads + 2 * num_kv_heads, head_dim});
    at::Tensor q = qkv.narrow(2, 0, num_heads), k = qkv.narrow(2, num_heads, num_kv_heads);
    if (qk_norm != kNoQkNorm) {  // new contiguous q and k
      q = norm_qk(q, base, kQNormW);
      k = norm_qk(k, base, kKNormW);
    }
    const at::Tensor v = qkv.narrow(2, num_heads + num_kv_heads, num_kv_heads);
    const at::Tensor kc = k_cache.select(0, i).narrow(0, 0, B), vc = v_cache.select(0, i).narrow(0, 0, B);
    const std::optional<at::Tensor>& c = local[i] ? local_cos : cos;
    const std::optional<at::Tensor>& s = local[i] ? local_sin : sin;
    rotary_append_kv_cpu(q, k, v, kc, vc, positions, rope[i] ? c : none, rope[i] ? s : none);
    const at::Tensor a = decode_attention_cpu(q.view({B, num_heads, head_dim}), kc, vc, seq_lens, scales[i]);
    const at::Tensor o = linear(a.view({B, num_heads * head_dim}), base, kOW);
    auto [h2, res2] = enter(leave(o, base, kAttnNormW, kAttnOutNormW), res, base, kMlpNormW);
    at::Tensor up = linear(h2, base, kUpW);
    if (activation == kSiluGated || activation == kGeluTanhGated) {
      const int64_t I = up.size(1) / 2;
      const at::Tensor gate = up.narrow(1, 0, I);
      up = (activation == kSiluGated ? at::silu(gate) : at::gelu(gate, "tanh")).mul_(up.narrow(1, I, I));
    } else if (activation == kRelu) {
      up.relu_();
    } else {
      up = at::gelu(up, activation == kGeluTanh ? "tanh" : "none");
    }
    hidden = leave(linear(up, base, kDownW), base, kMlpNormW, kMlpOutNormW);
    residual = res2;
  }
  const int64_t base = L * kSlots;
  const at::Tensor h = norm(hidden, residual, req(weights, base), opt(weights, base + 1)).first;
  at::Tensor logits = linear(h, base, 2);
  lengths.add_(1);
  return logits;
}

}  // namespace hybrid_engine
