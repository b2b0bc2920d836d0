"""decode_linear_bf16: generation's fast mode of the linear layers, out = bf16(x) @ weight.T + bias.

x fp32 [M, K], weight bf16 [N, K], bias [N] (fp32 or bf16) or None -> out fp32 [M, N]. The activations are rounded
to bf16 once (round to nearest even), as vLLM's CPU worker computes; products of bf16 pairs are exact in fp32 and
summed in fp32. This is the opt-in fast mode (activation_dtype=bf16 beside weight_dtype=bf16); decode_linear, the
exact path, never rounds the activations.

The CPU kernel (csrc/cpu/linear_bf16dot.cpp) runs on VDPBF16PS (AVX512-BF16): each 32-bit lane multiplies a pair of
bf16 and adds both products to an fp32 accumulator, twice the multiply-adds per instruction of the fp32 FMA that
decode_linear widens a bf16 weight for. Above a row count measured on the machine (ops/dispatch.py), as in a
prefill, torch's bf16 GEMM (oneDNN) takes over; its output is rounded to bf16 there. On a GPU, and on the
"reference" or "triton" backend, torch's bf16 linear computes it. A CPU without bf16 compute is refused
(bf16_compute_missing): there the fast mode would only be slower than the exact path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_engine import _build
from hybrid_engine.ops import _backend, dispatch
from hybrid_engine.ops._library import fake, kernels

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""The CPU flags of bf16 compute (/proc/cpuinfo names); without one the fast mode is refused."""


def decode_linear_bf16_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """Pure-torch decode_linear_bf16: x rounded to bf16, then an fp32 product and sum (the test oracle)."""
    out = x.to(torch.bfloat16).float() @ weight.float().T
    return out if bias is None else out + bias.float()


@fake("hybrid_engine::decode_linear_bf16")
def _decode_linear_bf16_fake(x, weight, bias):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1])
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def bf16_compute_missing(device: torch.device | str = "cpu") -> str | None:
    """Why the fast mode cannot run faster than the exact path on `device` (a CPU without AVX512-BF16 or AMX-BF16,
    where bf16 products are emulated), or None."""
    if torch.device(device).type != "cpu":
        return None
    if any(flag in _build.cpu_flags() for flag in BF16_CPU_FLAGS):
        return None
    return (f"this CPU ({_build.cpu_model()}) has no bf16 compute ({' or '.join(BF16_CPU_FLAGS)}): bf16 activations "
            "would only be slower than the exact fp32 ones; use activation_dtype=fp32")


def check_bf16_compute(activation_dtype: torch.dtype, setting: str = "activation_dtype") -> None:
    """Refuses the fast mode (`setting`=bf16) on a CPU without bf16 compute, in one line naming the setting."""
    missing = bf16_compute_missing() if activation_dtype == torch.bfloat16 else None
    if missing:
        raise ValueError(f"{setting}=bf16: {missing}")


def decode_linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, N] = bf16(x [M, K]) @ weight bf16 [N, K].T (+ bias [N]), bf16 products summed in fp32."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"decode_linear_bf16: weight must be bf16 (weight_dtype=bf16), got {weight.dtype}")
    if _backend.get_backend() != "kernels" or x.device.type != "cpu":
        out = F.linear(x.to(torch.bfloat16), weight).float()
        return out if bias is None else out + bias.float()
    dispatch.ensure()  # the hand-over row count to torch's bf16 GEMM, measured on this machine (dispatch.py)
    return kernels().decode_linear_bf16(x, weight, bias)
