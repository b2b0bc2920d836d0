// Argument checks shared by every CPU and CUDA binding. Each macro names the argument, so a bad
// call raises a Python error such as "decode_attention: q must be 3-D [B, Hq, D], got [2, 3]"
// instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace hybrid_engine {

inline std::string shape_str(const at::Tensor& t) { return t.sizes().vec().empty() ? "[]" : c10::str(t.sizes()); }

}  // namespace hybrid_engine

// The op name used in every message; each .cpp defines HE_OP before using the macros.
#define HE_CHECK(cond, ...) TORCH_CHECK(cond, HE_OP, ": ", __VA_ARGS__)

#define CHECK_DIM(x, n, layout) \
  HE_CHECK((x).dim() == (n), #x " must be ", n, "-D ", layout, ", got shape ", ::hybrid_engine::shape_str(x))

#define CHECK_SIZE(x, d, expected) \
  HE_CHECK((x).size(d) == (expected), #x ".size(", d, ") must be ", expected, ", got ", (x).size(d))

#define CHECK_SHAPE(x, ...)                                                                          \
  HE_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", at::IntArrayRef({__VA_ARGS__}), \
           ", got ", ::hybrid_engine::shape_str(x))

#define CHECK_DTYPE(x, dtype) \
  HE_CHECK((x).scalar_type() == (dtype), #x " must be ", dtype, ", got ", (x).scalar_type())

#define CHECK_FLOATING(x)                                                                               \
  HE_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||                     \
               (x).scalar_type() == at::kHalf,                                                          \
           #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())

#define CHECK_INDEX(x) \
  HE_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong, #x " must be int32 or int64, got ", (x).scalar_type())

#define CHECK_SAME_DTYPE(x, y) \
  HE_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())

#define CHECK_DEVICE(x, dev) HE_CHECK((x).device() == (dev), #x " must be on ", dev, ", got ", (x).device())

#define CHECK_CPU(x) HE_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())

#define CHECK_CUDA(x) HE_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())

#define CHECK_CONTIGUOUS(x) HE_CHECK((x).is_contiguous(), #x " must be contiguous")

#define CHECK_LAST_DIM_CONTIGUOUS(x) \
  HE_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must be contiguous in its last dimension, got strides ", (x).strides())

// Dispatch over the floating dtypes every kernel supports: fp32, bf16, fp16.
#define HE_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

// Dispatch over int32/int64 index tensors (sequence lengths, positions, token ids).
#define HE_DISPATCH_INDEX(dtype, name, ...) AT_DISPATCH_INDEX_TYPES(dtype, name, __VA_ARGS__)
