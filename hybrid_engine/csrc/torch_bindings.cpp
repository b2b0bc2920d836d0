// The one registration of every hybrid_engine op: its schema, its CPU kernel and (in CUDA builds)
// its CUDA kernel. Python reaches these only through hybrid_engine/ops/. `Tensor(a!)` marks an
// argument the op writes in place. Shape letters: B batch, T sequence, H heads (Hq query, Hkv
// key/value), D head dim, N rows, K in-features, V vocabulary.
#include <torch/library.h>

#include "hybrid_engine/ops.h"

TORCH_LIBRARY(hybrid_engine, m) {
  // q [B, Hq, D], k_cache/v_cache [B, Hkv, T_max, D], seq_lens int [B] -> [B, Hq, D].
  // Sequence b attends to cache positions [0, seq_lens[b]); Hq is a multiple of Hkv (GQA); D <= 256.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale) -> Tensor");
  // q [B, Hq, T, D], k/v [B, Hkv, T, D] (any strides but a contiguous last dim), seq_lens int [B]
  // -> [B, Hq, T, D] contiguous. Left padding: sequence b holds the last seq_lens[b] positions;
  // query t attends to keys [T - seq_lens[b], t]; padded query rows are zero.
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor seq_lens, float scale) -> Tensor");
  // q [B, S, Hq, D], k/v [B, S, Hkv, D] (any strides but a contiguous last dim),
  // k_cache/v_cache [B, Hkv, T_max, D] contiguous, positions int [B, S], cos/sin fp32 [P, R/2]
  // (R <= D rotary dims, Hugging Face rotate_half convention). For every token with position
  // p >= 0: rotates q and k in place at position p and writes k, v to cache slot p. Tokens with
  // p < 0 (padding) are left untouched. Without cos/sin it only appends.
  m.def(
      "rotary_append_kv(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor(c!) k_cache, Tensor(d!) v_cache, "
      "Tensor positions, Tensor? cos, Tensor? sin) -> ()");
  // x [..., H], weight [H] -> out like x, rstd fp32 [...] (1 / rms of each row).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor out, Tensor rstd)");
  // Training ops (CPU; other devices use the Python reference). rotary_embed: HF's apply_rotary_pos_emb on
  // q [B, Hq, T, D] and k [B, Hkv, T, D] with cos/sin fp32 [B or 1, T, D]; backward=True applies its
  // transpose (the gradient). silu_mul: silu(gate) * up, the gated MLP's activation, and its backward.
  m.def("rotary_embed(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // new_residual = x + residual; out = rms_norm(new_residual) * weight.
  m.def(
      "rms_norm_residual(Tensor x, Tensor residual, Tensor weight, float eps) -> "
      "(Tensor out, Tensor new_residual, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> "
      "(Tensor grad_x, Tensor grad_weight)");
  // hidden [N, K], weight [V, K], tokens int64 [N] -> logprobs fp32 [N], entropy fp32 [N] (zeros
  // unless with_entropy), lse fp32 [N] (log-sum-exp of the scaled logits, saved for backward).
  m.def(
      "token_logprobs(Tensor hidden, Tensor weight, Tensor tokens, float temperature, bool with_entropy) -> "
      "(Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor tokens, Tensor lse, Tensor entropy, float temperature) -> (Tensor grad_hidden, Tensor grad_weight)");
  // rewards/values/mask [B, T] -> advantages, returns fp32 [B, T].
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  // src (contiguous, any dtype) viewed flat; out[i, j] = src[offset + r(i) * row_stride + col_start + j]
  // where r runs over the row blocks [row_starts[k], row_starts[k] + row_counts[k]) in order
  // -> [sum(row_counts), col_count]. col_start + col_count <= row_stride; every index is bounds checked.
  m.def(
      "reshard_gather(Tensor src, int offset, int row_stride, int[] row_starts, int[] row_counts, int col_start, "
      "int col_count) -> Tensor");
  // The inverse: writes shard [sum(row_counts), C] (dst's dtype) into dst (contiguous) viewed flat at the
  // same places.
  m.def(
      "reshard_scatter(Tensor(a!) dst, Tensor shard, int offset, int row_stride, int[] row_starts, "
      "int[] row_counts, int col_start) -> ()");
  // x fp32 [M, K] (M small), weight fp32/bf16 [N, K], bias [N] -> fp32 [M, N]; fp32 accumulation.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Generation's fast mode: x fp32 [M, K] rounded to bf16, weight bf16 [N, K], bias [N] -> fp32 [M, N]; bf16
  // products summed in fp32 (prefill-sized M: torch's bf16 GEMM, its output rounded to bf16).
  m.def("decode_linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The expert MLPs of a Mixture-of-Experts layer: x fp32 [M, H], expert_ids int64 [M, k], routing_weights
  // fp32 [M, k], gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I] -> fp32 [M, H], the sum over each
  // token's experts e (ascending) of weight * down[e] @ (silu(gate[e] @ x) * up[e] @ x); each selected expert's
  // weights are read once for all its tokens.
  m.def("moe_experts(Tensor x, Tensor expert_ids, Tensor routing_weights, Tensor gate_up, Tensor down) -> Tensor");
  // The CPU dispatch choices, process-wide, set by the calibration (hybrid_engine/ops/dispatch.py):
  // decode_linear's hand-over rows to torch's GEMM and to the AMX tiles, and bf16 prefill's SDPA route.
  m.def("set_decode_linear_routes(int fp32_torch_max_rows, int fp32_kernel_max_rows, int lowp_kernel_max_rows, "
        "int amx_min_rows) -> ()",
        &hybrid_engine::set_decode_linear_routes);
  m.def("decode_linear_routes() -> int[]", &hybrid_engine::decode_linear_routes);
  m.def("decode_linear_has_amx(int K) -> bool", &hybrid_engine::decode_linear_has_amx);
  m.def("set_decode_linear_bf16_route(int kernel_max_rows) -> ()", &hybrid_engine::set_decode_linear_bf16_route);
  m.def("decode_linear_bf16_route() -> int", &hybrid_engine::decode_linear_bf16_route);
  m.def("decode_linear_has_bf16dot() -> bool", &hybrid_engine::decode_linear_has_bf16dot);
  m.def("set_prefill_sdpa_route(int route) -> ()", &hybrid_engine::set_prefill_sdpa_route);
  m.def("prefill_sdpa_route() -> int", &hybrid_engine::prefill_sdpa_route);
  // One decode step of a whole decoder-only model (CPU; GPUs replay the Python loop in a CUDA graph).
  // x fp32 [B, H] (embedded tokens), weights: 14 per layer (attn norm w/b, qkv w/b, o w/b, mlp norm
  // w/b, up w/b, down w/b, q norm w, k norm w) then final norm w/b and LM head w/b, None where absent;
  // caches [L, B_max, Hkv, T_max, D]; lengths int32 [B] (incremented) -> logits fp32 [B, V].
  // activation: 0 silu-gated (fused gate|up), 1 relu, 2 gelu (tanh), 3 gelu, 4 gelu (tanh)-gated (Gemma 3).
  // qk_norm: 0 none, 1 RMSNorm of q and k per head over D before RoPE (Qwen3), 2 over the whole projection
  // (OLMo 2). post_norm: the attention and MLP norms act on the sublayers' outputs (OLMo 2).
  // nope_layers: the layers whose q and k take no RoPE, k and v appended as they are (SmolLM3's NoPE layers).
  // local_layers take their RoPE from local_cos, local_sin (Gemma 3's sliding layers); weights slots 14, 15 are
  // norms of the attention's and MLP's outputs where a block has norms on both sides (Gemma 3), else undefined.
  // bf16_activations: the linear layers are decode_linear_bf16's (generation's fast mode), else decode_linear's.
  m.def(
      "decode_step(Tensor x, Tensor?[] weights, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, "
      "Tensor? cos, Tensor? sin, int num_heads, int num_kv_heads, int head_dim, bool rms_norm, int activation, "
      "float eps, float[] scales, int qk_norm=0, bool post_norm=False, int[] nope_layers=[], Tensor? local_cos=None, "
      "Tensor? local_sin=None, int[] local_layers=[], bool bf16_activations=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybrid_engine, CPU, m) {
  m.impl("decode_attention", &hybrid_engine::decode_attention_cpu);
  m.impl("prefill_attention", &hybrid_engine::prefill_attention_cpu);
  m.impl("rotary_append_kv", &hybrid_engine::rotary_append_kv_cpu);
  m.impl("rms_norm", &hybrid_engine::rms_norm_cpu);
  m.impl("rotary_embed", &hybrid_engine::rotary_embed_cpu);
  m.impl("silu_mul", &hybrid_engine::silu_mul_cpu);
  m.impl("silu_mul_backward", &hybrid_engine::silu_mul_backward_cpu);
  m.impl("rms_norm_residual", &hybrid_engine::rms_norm_residual_cpu);
  m.impl("rms_norm_backward", &hybrid_engine::rms_norm_backward_cpu);
  m.impl("token_logprobs", &hybrid_engine::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &hybrid_engine::token_logprobs_backward_cpu);
  m.impl("gae", &hybrid_engine::gae_cpu);
  m.impl("reshard_gather", &hybrid_engine::reshard_gather_cpu);
  m.impl("reshard_scatter", &hybrid_engine::reshard_scatter_cpu);
  m.impl("decode_linear", &hybrid_engine::decode_linear_cpu);
  m.impl("decode_linear_bf16", &hybrid_engine::decode_linear_bf16_cpu);
  m.impl("decode_step", &hybrid_engine::decode_step_cpu);
  m.impl("moe_experts", &hybrid_engine::moe_experts_cpu);
}

#ifdef HYBRID_ENGINE_CUDA
TORCH_LIBRARY_IMPL(hybrid_engine, CUDA, m) {
  m.impl("decode_attention", &hybrid_engine::decode_attention_cuda);
  m.impl("prefill_attention", &hybrid_engine::prefill_attention_cuda);
  m.impl("rotary_append_kv", &hybrid_engine::rotary_append_kv_cuda);
  m.impl("rms_norm", &hybrid_engine::rms_norm_cuda);
  m.impl("rms_norm_residual", &hybrid_engine::rms_norm_residual_cuda);
  m.impl("rms_norm_backward", &hybrid_engine::rms_norm_backward_cuda);
  m.impl("token_logprobs", &hybrid_engine::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &hybrid_engine::token_logprobs_backward_cuda);
  m.impl("gae", &hybrid_engine::gae_cuda);
  m.impl("reshard_gather", &hybrid_engine::reshard_gather_cuda);
  m.impl("reshard_scatter", &hybrid_engine::reshard_scatter_cuda);
  m.impl("decode_linear", &hybrid_engine::decode_linear_cuda);
  m.impl("moe_experts", &hybrid_engine::moe_experts_cuda);
}
#endif
