import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, assert_within_twice_torch

from hybrid_engine.ops import decode_linear, decode_linear_reference, kernels, use_backend

# (N, K): K and N off every vector width (7, 123, 777), single outputs, the realistic K of a small model, and K
# split into several passes (2048, 2051). M: single rows to past two 32-row tiles, and for fp32 weights (linear.cpp's
# block_rows) one block of 3 or 7 rows, blocks of 4 (8, 64; 11 with a padded row), of 5 (9) and of 6 (17); bf16
# weights with K % 32 == 0 and M >= 8 take the AMX path where the CPU has it, the rest the FMA kernel.
SHAPES = [(1, 7), (1, 64), (5, 123), (123, 777), (123, 768), (40, 2048), (5, 2051)]
M_VALUES = [1, 3, 7, 8, 9, 11, 17, 64]
WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(M, N, K, wdtype, bias=None, device="cpu"):
    """x fp32 [M, K], weight [N, K] in wdtype, bias [N] in `bias` dtype (None: no bias)."""
    x = torch.randn(M, K, device=device)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(wdtype)
    b = None if bias is None else torch.randn(N, device=device).to(bias)
    return x, weight, b


def test_reference_matches_float64_loop():
    x, w, b = make_inputs(3, 5, 7, torch.bfloat16, torch.float32)
    expected = torch.tensor(
        [[sum(float(x[m, k]) * float(w[n, k]) for k in range(7)) + float(b[n]) for n in range(5)] for m in range(3)]
    )
    torch.testing.assert_close(decode_linear_reference(x, w, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", M_VALUES)
def test_kernel_matches_reference(M, N, K, wdtype, with_bias):
    x, w, b = make_inputs(M, N, K, wdtype, wdtype if with_bias else None)
    out = decode_linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    # The weight is widened exactly and everything else is fp32, so only the order of the sums differs.
    torch.testing.assert_close(out, decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("M", [1, 17, 64])
def test_bf16_weight_keeps_fp32_activations(M):
    """Against the unrounded fp32 weight, our only error is the weight's rounding: within twice that of
    torch's bf16 linear, which also rounds the activations and the output."""
    x, w32, b32 = make_inputs(M, 96, 768, torch.float32, torch.float32)
    w, b = w32.bfloat16(), b32.bfloat16()
    reference = decode_linear_reference(x, w32, b32)
    assert_within_twice_torch(decode_linear(x, w, b), reference, F.linear(x.bfloat16(), w, b))


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
def test_large_m(wdtype):
    """Past 64 rows (and at one row) an fp32 weight goes to torch's GEMM; the other dtypes stay on the kernels."""
    x, w, b = make_inputs(100, 123, 768, wdtype, torch.float32)
    torch.testing.assert_close(decode_linear(x, w, b), decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("bias", [None, torch.float32, torch.bfloat16])
def test_bias_dtypes(bias):
    x, w, b = make_inputs(4, 33, 64, torch.bfloat16, bias)
    torch.testing.assert_close(decode_linear(x, w, b), decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("M,N,K", [(0, 5, 7), (3, 0, 7), (3, 5, 0)])
def test_empty_shapes(M, N, K):
    x, w, b = make_inputs(M, N, K, torch.float32, torch.float32)
    torch.testing.assert_close(decode_linear(x, w, b), decode_linear_reference(x, w, b))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 5, 123), (17, 33, 64)])
def test_triton_matches_reference(M, N, K, wdtype):
    x, w, b = make_inputs(M, N, K, wdtype, torch.float32)
    with use_backend("triton"):
        out = decode_linear(x, w, b)
    torch.testing.assert_close(out, decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])
    with use_backend("triton"):
        out = decode_linear(x, w)
    torch.testing.assert_close(out, decode_linear_reference(x, w), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_gradients(wdtype):
    x, w, b = make_inputs(5, 33, 123, wdtype, wdtype)
    grad_out = torch.randn(5, 33)
    grads = []
    for fn in (decode_linear, decode_linear_reference):
        inputs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        fn(*inputs).backward(grad_out)
        grads.append([t.grad for t in inputs])
    for ours, ref in zip(*grads):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, **TOLERANCES[ours.dtype])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_opcheck(wdtype, with_bias):
    x, w, b = make_inputs(3, 17, 40, wdtype, torch.float32 if with_bias else None)
    torch.library.opcheck(kernels().decode_linear.default, (x, w, b))
    torch.library.opcheck(kernels().decode_linear.default, (x.requires_grad_(), w, b))


def test_compiles_with_torch_compile():
    x, w, b = make_inputs(4, 33, 64, torch.bfloat16, torch.float32)
    compiled = torch.compile(lambda x, w, b: decode_linear(x, w, b).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), decode_linear_reference(x, w, b).relu(), **TOLERANCES[torch.float32])


def _bad(x=(2, 8), w=(4, 8), b=(4,), xdtype=torch.float32, wdtype=torch.float32, bdtype=torch.float32):
    bias = None if b is None else torch.randn(b).to(bdtype)
    return torch.randn(x).to(xdtype), torch.randn(w).to(wdtype), bias


@pytest.mark.parametrize(
    "args,match",
    [
        (_bad(x=(8,)), "x must be 2-D"),
        (_bad(xdtype=torch.bfloat16), "x must be Float"),
        ((torch.randn(8, 2).T, *_bad()[1:]), "x must be contiguous"),
        (_bad(w=(4, 8, 1)), "weight must be 2-D"),
        (_bad(w=(4, 9)), r"weight.size\(1\) must be 8"),
        (_bad(wdtype=torch.int32), "weight must be float32, bfloat16 or float16"),
        ((_bad()[0], torch.randn(8, 4).T, None), "weight must be contiguous"),
        (_bad(b=(4, 1)), "bias must be 1-D"),
        (_bad(b=(5,)), r"bias.size\(0\) must be 4"),
        (_bad(wdtype=torch.bfloat16, bdtype=torch.float16), "bias must be float32 or weight's dtype"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        decode_linear(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 5, 123), (17, 123, 777), (64, 96, 768)])
def test_cuda_matches_reference(M, N, K, wdtype, backend):
    x, w, b = make_inputs(M, N, K, wdtype, torch.float32, device="cuda")
    with use_backend(backend):
        out = decode_linear(x, w, b)
    torch.testing.assert_close(out, decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])
