// decode_linear on AMX tiles (csrc/cpu/linear_amx.cpp): the path csrc/cpu/linear.cpp takes for larger
// activation blocks on CPUs with AMX-BF16. Only AVX-512 builds have it.
#pragma once

#include <cstdint>

namespace hybrid_engine::amx {

// Whether this machine runs the AMX path (AMX-BF16 and the kernel's permission to use it) for this K.
bool usable(int64_t K);

// out fp32 [M, N] = x fp32 [M, K] @ weight[N, K]^T (+ bias fp32 [N]), weight fp32 or (bf16) bf16, all
// contiguous; K a multiple of 32.
void decode_linear(const float* x, const void* weight, bool bf16, const float* bias, float* out, int64_t M,
                   int64_t N, int64_t K);

}  // namespace hybrid_engine::amx
