"""Rounding of fp32 results to the storage dtype, shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """x (fp32) rounded to nearest even in `dtype`. bf16 is rounded by hand: Triton's interpreter
    truncates fp32 -> bf16 where compiled Triton rounds, and the kernels must agree in both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
