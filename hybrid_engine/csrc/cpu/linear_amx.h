// decode_linear on AMX tiles (hybrid_engine/csrc/cpu/linear_amx.cpp): the path hybrid_engine/csrc/cpu/linear.cpp
// takes for bf16 weights and larger activation blocks on CPUs with AMX-BF16. Only AVX-512 builds have it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace hybrid_engine::amx {

// Whether this machine runs the AMX path (AMX-BF16 and the kernel's permission to use it) for this K.
bool usable(int64_t K);

// out fp32 [M, N] = x fp32 [M, K] @ weight bf16 [N, K]^T (+ bias fp32 [N] or nullptr), all contiguous; K a
// multiple of 32.
void decode_linear(const float* x, const c10::BFloat16* weight, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K);

}  // namespace hybrid_engine::amx
