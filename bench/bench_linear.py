"""decode_linear over every weight matrix of a ~125M Llama, as in one decode step, against torch.

The model: hidden 768, intermediate 2048, 12 layers, 12 query / 4 kv heads of dim 64, so per layer a fused
qkv [1280, 768], o [768, 768], fused gate_up [4096, 768] and down [768, 2048]. The timed call runs M activation
rows through all 12 layers' 48 distinct matrices, so the working set is the whole model (302 MB in fp32, 151 MB
in bf16), not one matrix that would sit in cache.

Providers: ours (decode_linear); torch, the best honest torch equivalent: `x @ w.T` for an fp32 weight, and for
a bf16 weight `F.linear(x.bfloat16(), w).float()`, which rounds the activations to bf16 (less accurate than ours,
which keeps them fp32; the alternative, `x @ w.float().T`, is the eager reference); eager (the pure-torch
reference, which widens a bf16 weight to fp32 on every call); compile (torch.compile of the reference).

Ours and torch also record their fraction of a roofline measured beside them (harness.paired_roofline_fraction):
this VM's read rate drifts by up to a third within a run, so the run's one roofline probe can sit far from the
bandwidth a case actually had.
"""

import pytest
import torch
import torch.nn.functional as F
from harness import baseline_time, paired_roofline_fraction, record, representative, run_benchmark

from hybrid_engine.ops import decode_linear, decode_linear_reference

LAYERS = 12
SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)]  # qkv, o, gate_up, down: [N, K]


@pytest.fixture(scope="module")
def model():
    """The 48 weight matrices per dtype, made once: fp32 and its bf16 copy."""
    fp32 = [(torch.randn(n, k) / k**0.5) for _ in range(LAYERS) for n, k in SHAPES]
    return {torch.float32: fp32, torch.bfloat16: [w.bfloat16() for w in fp32]}


def _torch_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T if w.dtype == torch.float32 else F.linear(x.bfloat16(), w).float()


def _step(fn, weights, xs):
    """One decode step's linear layers: every matrix once, each fed the activations of its K."""

    def run():
        for w in weights:
            fn(xs[w.shape[1]], w)

    return run


@pytest.mark.parametrize("provider", representative(["ours", "torch", "eager", "compile"], "ours", "torch"))
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", representative([1, 4, 16, 32], 1))
def test_decode_linear(benchmark, M, wdtype, provider, model, machine, roofline):
    weights = model[wdtype]
    xs = {k: torch.randn(M, k) for k in {k for _, k in SHAPES}}
    fns = {
        "ours": decode_linear,
        "torch": _torch_linear,
        "eager": decode_linear_reference,
        "compile": torch.compile(decode_linear_reference, dynamic=False),
    }
    fn = _step(fns[provider], weights, xs)
    dtype_name = str(wdtype).removeprefix("torch.")
    benchmark.group = f"decode_linear M={M} weight={dtype_name}"
    run_benchmark(benchmark, fn, rounds=10)
    # Each matrix read once, x read and out written once per matrix.
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    act_bytes = sum(4 * M * (w.shape[0] + w.shape[1]) for w in weights)
    flops = sum(2 * M * w.numel() for w in weights)
    key = f"decode_linear M={M} {dtype_name}"
    torch_s = baseline_time(f"{key} torch", _step(_torch_linear, weights, xs))
    paired = {}
    if provider in ("ours", "torch"):
        fraction, probe = paired_roofline_fraction(fn, weight_bytes + act_bytes, flops)
        paired = dict(roofline_fraction_paired=round(fraction, 3),
                      paired_read_GBps=round(probe.read_bytes_per_s / 1e9, 1))
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(f"{key} eager", _step(decode_linear_reference, weights, xs)),
        machine=machine,
        roofline=roofline,
        bytes_moved=weight_bytes + act_bytes,
        flops=flops,
        speedup_vs_torch=round(torch_s / benchmark.stats.stats.median, 3),
        M=M,
        weight_dtype=dtype_name,
        **paired,
    )
