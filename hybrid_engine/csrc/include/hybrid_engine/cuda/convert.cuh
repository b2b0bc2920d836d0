// fp32 <-> storage-type conversions shared by the CUDA kernels (device code only, torch-free).
// Kernels load fp32/bf16/fp16, compute in fp32 and round once, to nearest even, on the store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid_engine::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

}  // namespace hybrid_engine::cuda
