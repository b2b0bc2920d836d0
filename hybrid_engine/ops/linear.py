"""decode_linear: the linear layers of a generation step, out = x @ weight.T + bias, for a few activation rows.

x fp32 [M, K] (M: the sequences of a decode batch, up to about 64), weight [N, K] fp32, bf16 or fp16, bias [N]
(fp32 or the weight's dtype) or None -> out fp32 [M, N]. Products and sums are fp32: a low-precision weight
only changes how the weight is stored; the activations are never rounded.

Why a kernel of its own: with M this small the work is reading the weight once, yet torch's fp32 matmul reads
it at well under the memory bandwidth for 4-32 rows, and a bf16 weight needs either a full fp32 copy or a bf16
matmul that rounds the activations. The CPU kernel streams each weight row once for all M rows (an FMA
micro-kernel; bf16 weights with 8+ rows on AMX tiles, the activations split exactly into three bf16 terms).
Where torch's GEMM is faster (an fp32 weight with very few or many rows, a bf16 weight with prefill-sized M,
widened once) the op hands over to it, at row counts measured on the machine (ops/dispatch.py); so does a bf16
weight with M >= 8 to the AMX tiles, where the CPU has them.

The widening of a bf16 weight for prefill-sized M, measured on an Ice Lake-class Xeon (2 cores, no AMX): 28.5 ms
for the 125M model's 48 matrices (151 MB read, 302 MB written), beside 180-200 ms of GEMM at M = 256 and 550-630
ms at M = 1024, so 5-15% of a prefill; below the calibrated row count (64-128 there) the kernel reads the bf16
weight directly and nothing is widened. Widening one block of rows at a time into a cache-resident buffer, each
block then multiplied by torch's GEMM, was tried and lost (1 MB blocks: 1.4x slower at M = 256; 4 MB: 1.1x;
16 MB, about whole matrices, equal): MKL's GEMM loses more on narrow blocks than the copy costs.

Where it cannot be 1.5x faster than the eager reference (measured on the whole-model benchmark,
bench/bench_linear.py, 2 Sapphire Rapids cores): with M = 1 and an fp32 weight torch's matrix-vector product
already streams the weight at the read bandwidth (about 1.3x the roofline's `sum()` rate, 10% faster than this
kernel), so that case runs torch's GEMV. With an fp32 weight and M = 16-32 the FMA work (at about 83% of the
FMA peak, 2 x M x N x K FLOPs) takes as long as the stream of the weight (12 ms for the 302 MB model at 25 GB/s),
and a core that saturates its FMA units keeps only part of its memory stream in flight: the two overlap
partly, giving about 0.7-0.8 (M = 16) and 0.5-0.6 (M = 32) of the roofline against torch's 0.4-0.5, 1.3-1.4x
faster than torch.

The activation rows go through the micro-kernel in blocks of C rows against R weight rows (R x C accumulators in
registers). With fp32 weights on AVX-512, blocks of 4 rows (R = 6) beat blocks of 8 (R = 3, the earlier choice for
M >= 8), measured on the Zen 4 (2 shared cores; one thread, CPU time, so that the other processes on the machine
do not enter the figure; interleaved, best of 5): 1.10x at M = 16 and 64, 1.09x at M = 8 and 1.06x at M = 32 over
the 125M model's linears, most of it in the down projection (K = 2048), which blocks of 8 split into two K passes
of 1024 (its 32 KB activation block fills the L1) and blocks of 4 run in one. Blocks of 2 or 3 rows ran 0.75-0.8x,
blocks of 5 and 6 as 8. The whole decode step gained 1.07-1.09x at batch 16 and 1.02-1.05x at 64 (one thread, CPU
time).
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend, dispatch
from hybrid_engine.ops._library import autograd, fake, kernels


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch decode_linear in fp32: the test oracle."""
    out = x.float() @ weight.float().T
    return out if bias is None else out + bias.float()


@fake("hybrid_engine::decode_linear")
def _decode_linear_fake(x, weight, bias):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1])
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_out @ weight.float() if ctx.needs_input_grad[0] else None
    grad_w = (grad_out.T @ x).to(weight.dtype) if ctx.needs_input_grad[1] else None
    grad_b = grad_out.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


autograd("hybrid_engine::decode_linear", _backward, setup_context=_setup_context)


# The Triton and CUDA kernels are written for decode's few rows; above this many, torch's GEMM.
GPU_MAX_ROWS = 64


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] @ weight[N, K].T (+ bias [N]), with fp32 products and sums for any weight dtype."""
    backend = _backend.get_backend()
    if backend == "reference" or (x.shape[0] > GPU_MAX_ROWS and (backend == "triton" or x.device.type != "cpu")):
        return decode_linear_reference(x, weight, bias)
    if backend == "triton":
        from hybrid_engine.triton.linear import decode_linear as decode_linear_triton

        return decode_linear_triton(x, weight, bias)
    if x.device.type == "cpu":
        dispatch.ensure()  # the hand-over rows to torch's GEMM, measured on this machine (dispatch.py)
    return kernels().decode_linear(x, weight, bias)
