// CUDA launchers for token_logprobs (hybrid_engine/csrc/cuda/logprobs.cu). Torch-free: raw pointers, sizes and a
// stream. The logits blocks come from a GEMM done by the caller (cuBLAS through at::mm); these
// kernels do everything after it. Each launcher has an fp32, a bf16 and an fp16 overload; the
// logits' dtype is the one the GEMM produced (the inputs' dtype), the softmax math is fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine::cuda {

// logits [rows, V] contiguous raw (unscaled) logits of rows [0, rows); tokens int64 [rows] (-100 =
// ignored, others in [0, V)). Writes fp32 [rows]: lse = logsumexp(logits / T), logprobs =
// logits[tok] / T - lse (0 when ignored) and, if with_entropy, the entropy of softmax(logits / T).
cudaError_t token_logprobs_rows(const float* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream);
cudaError_t token_logprobs_rows(const __nv_bfloat16* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream);
cudaError_t token_logprobs_rows(const __half* logits, const int64_t* tokens, float* logprobs, float* entropy,
                                float* lse, int64_t rows, int64_t V, float inv_t, bool with_entropy,
                                cudaStream_t stream);

// logits [rows, cols] contiguous raw logits of vocabulary [v0, v0 + cols), overwritten in place with
// the gradient of the loss with respect to them, given fp32 [rows] grad_logprobs, grad_entropy
// (nullptr when absent) and the forward's lse and entropy.
cudaError_t token_logprobs_grad_logits(float* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream);
cudaError_t token_logprobs_grad_logits(__nv_bfloat16* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream);
cudaError_t token_logprobs_grad_logits(__half* logits, const int64_t* tokens, const float* grad_logprobs,
                                       const float* grad_entropy, const float* lse, const float* entropy,
                                       int64_t rows, int64_t cols, int64_t v0, float inv_t, cudaStream_t stream);

}  // namespace hybrid_engine::cuda
