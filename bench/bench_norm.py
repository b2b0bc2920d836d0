"""rms_norm against HF-style eager torch (LlamaRMSNorm after the decoder layer's residual add) and
torch.compile of it: the training shape forward and forward + backward, and a decode step."""

import pytest
import torch
from harness import baseline_time, record, representative, run_benchmark

from hybrid_engine.ops import rms_norm, rms_norm_reference

H, EPS = 2048, 1e-6
ROWS = {"train": 16 * 512, "decode": 16}
# (shape, pass): the decode step only runs forward.
CASES = [("train", "forward"), ("train", "forward+backward"), ("decode", "forward")]


def make_step(fn, x, weight, residual, backward):
    """One call of fn (rms_norm or its reference), with a backward through it when asked."""
    grads = [torch.randn_like(x) for _ in range(1 if residual is None else 2)]

    def step():
        results = fn(x, weight, EPS, residual)
        results = results if isinstance(results, tuple) else (results,)
        if backward:
            torch.autograd.backward(results, grads)
        return results

    return step


@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile"], "ours", "eager"))
@pytest.mark.parametrize("with_residual", representative([False, True], True))
@pytest.mark.parametrize("dtype", representative([torch.float32, torch.bfloat16], torch.float32), ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,mode", representative(CASES, ("train", "forward+backward")))
def test_rms_norm(benchmark, shape, mode, dtype, with_residual, provider, machine, roofline):
    N, backward = ROWS[shape], mode == "forward+backward"
    x = torch.randn(N, H, dtype=dtype, requires_grad=backward)
    residual = torch.randn(N, H, dtype=dtype, requires_grad=backward) if with_residual else None
    weight = torch.randn(H, dtype=dtype, requires_grad=backward)
    fn = {"ours": rms_norm, "eager": rms_norm_reference, "compile": torch.compile(rms_norm_reference)}[provider]
    key = f"rms_norm {shape} [{N}, {H}] {mode} {dtype} residual={with_residual}"
    benchmark.group = key
    run_benchmark(benchmark, make_step(fn, x, weight, residual, backward), rounds=10 if shape == "train" else 50)
    # Forward reads x (and residual) and writes out (and new_residual); the backward reads grad_out,
    # x (and the grad of new_residual) and writes grad_x. All [N, H] in x's dtype.
    tensors = (4 if with_residual else 2) + ((4 if with_residual else 3) if backward else 0)
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(key, make_step(rms_norm_reference, x, weight, residual, backward)),
        machine=machine,
        roofline=roofline,
        bytes_moved=tensors * N * H * x.element_size(),
        flops=(12 if backward else 4) * N * H,
        tokens_per_s=round(N / benchmark.stats.stats.median),
    )
