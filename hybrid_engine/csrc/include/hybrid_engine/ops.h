// Declarations of every op's CPU implementation (hybrid_engine/csrc/cpu/<family>.cpp) and, in CUDA builds, its
// CUDA host function (hybrid_engine/csrc/cuda/bindings.cpp). Schemas and shape contracts:
// hybrid_engine/csrc/torch_bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace hybrid_engine {

// ---- attention (hybrid_engine/csrc/cpu/attention.cpp) ----
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seq_lens, double scale);
at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& seq_lens, double scale);
// The argument checks both devices share (then each checks q's device type).
// bf16 prefill's route to torch's flash attention (attention.cpp): -1 where AMX is, 0 never, 1 always.
void set_prefill_sdpa_route(int64_t route);
int64_t prefill_sdpa_route();
void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens);
void check_prefill_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seq_lens);

// ---- rotary (hybrid_engine/csrc/cpu/rotary.cpp) ----
void rotary_append_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin);

// ---- norm (hybrid_engine/csrc/cpu/norm.cpp) ----
std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                     const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd);

// ---- logprobs (hybrid_engine/csrc/cpu/logprobs.cpp) ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& tokens, double temperature,
                                                                  bool with_entropy);
std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                                               const std::optional<at::Tensor>& grad_entropy,
                                                               const at::Tensor& hidden, const at::Tensor& weight,
                                                               const at::Tensor& tokens, const at::Tensor& lse,
                                                               const at::Tensor& entropy, double temperature);

// ---- gae (hybrid_engine/csrc/cpu/gae.cpp) ----
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                           double gamma, double lam);

// ---- reshard (hybrid_engine/csrc/cpu/reshard.cpp) ----
at::Tensor reshard_gather_cpu(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                              at::IntArrayRef row_counts, int64_t col_start, int64_t col_count);
void reshard_scatter_cpu(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                         at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start);

// ---- training ops (hybrid_engine/csrc/cpu/rotary.cpp, hybrid_engine/csrc/cpu/swiglu.cpp), CPU only ----
// HF's apply_rotary_pos_emb for q [B, Hq, T, D] and k (its transpose with `backward`), contiguous outputs.
std::tuple<at::Tensor, at::Tensor> rotary_embed_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin, bool backward);
at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                         const at::Tensor& up);

// ---- linear (hybrid_engine/csrc/cpu/linear.cpp) ----
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// Where decode_linear_cpu hands over to torch's GEMM (see linear.cpp); process-wide, set by the calibration.
void set_decode_linear_routes(int64_t fp32_torch_max_rows, int64_t fp32_kernel_max_rows,
                              int64_t lowp_kernel_max_rows, int64_t amx_min_rows);
std::vector<int64_t> decode_linear_routes();
// Whether this build and CPU run bf16 weights with K elements per row on AMX tiles (linear_amx.cpp).
bool decode_linear_has_amx(int64_t K);
// ---- linear with bf16 activations, generation's fast mode (hybrid_engine/csrc/cpu/linear_bf16dot.cpp) ----
at::Tensor decode_linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias);
// Above kernel_max_rows rows decode_linear_bf16_cpu hands over to torch's bf16 GEMM; set by the calibration.
void set_decode_linear_bf16_route(int64_t kernel_max_rows);
int64_t decode_linear_bf16_route();
// Whether this build and CPU have the VDPBF16PS kernel (AVX512-BF16).
bool decode_linear_has_bf16dot();

// ---- moe (hybrid_engine/csrc/cpu/moe.cpp) ----
at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                           const at::Tensor& gate_up, const at::Tensor& down);
// The argument checks both devices share (then each checks x's device type).
void check_moe_experts_args(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                            const at::Tensor& gate_up, const at::Tensor& down);

// ---- decode_step (hybrid_engine/csrc/cpu/decode_step.cpp): a whole model's decode step, CPU only ----
at::Tensor decode_step_cpu(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& weights,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
                           const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bool rms_norm,
                           int64_t activation, double eps, at::ArrayRef<double> scales, int64_t qk_norm,
                           bool post_norm, at::IntArrayRef nope_layers, const std::optional<at::Tensor>& local_cos,
                           const std::optional<at::Tensor>& local_sin, at::IntArrayRef local_layers,
                           bool bf16_activations);

#ifdef HYBRID_ENGINE_CUDA
// ---- CUDA host functions (hybrid_engine/csrc/cuda/bindings.cpp), same contracts as the CPU ones ----
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seq_lens, double scale);
at::Tensor prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seq_lens, double scale);
void rotary_append_kv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& positions,
                           const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin);
std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& tokens, double temperature,
                                                                   bool with_entropy);
std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                                                const std::optional<at::Tensor>& grad_entropy,
                                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                                const at::Tensor& tokens, const at::Tensor& lse,
                                                                const at::Tensor& entropy, double temperature);
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                            double gamma, double lam);
at::Tensor reshard_gather_cuda(const at::Tensor& src, int64_t offset, int64_t row_stride, at::IntArrayRef row_starts,
                               at::IntArrayRef row_counts, int64_t col_start, int64_t col_count);
void reshard_scatter_cuda(const at::Tensor& dst, const at::Tensor& shard, int64_t offset, int64_t row_stride,
                          at::IntArrayRef row_starts, at::IntArrayRef row_counts, int64_t col_start);
at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor moe_experts_cuda(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& routing_weights,
                            const at::Tensor& gate_up, const at::Tensor& down);
#endif

}  // namespace hybrid_engine
