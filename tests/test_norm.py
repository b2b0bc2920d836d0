import pytest
import torch
from helpers import TOLERANCES, assert_within_twice_torch

from hybrid_engine.ops import kernels, rms_norm, rms_norm_reference, use_backend

EPS = 1e-6
# Row counts 1, 7, 123 and H of 1, odd sizes, head-dim-like sizes and a model width; 3-D inputs too.
SHAPES = [(1, 1), (7, 64), (123, 80), (5, 7, 123), (2, 3, 2048)]
# The Triton interpreter pays per program (one per row forward): keep the row counts small.
TRITON_SHAPES = [(1, 1), (7, 64), (5, 3, 123)]
# fp32 grads sum over rows, so they get a little more room than one forward rounding.
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
# x's dtype and weight's (None: x's); HF keeps an fp32 weight beside bf16 activations in mixed precision.
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


def make_inputs(shape, dtype, weight_dtype=None, device="cpu"):
    x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype)
    return x, residual, weight


def outputs(x, weight, residual):
    """rms_norm's results as a tuple, with and without a residual."""
    result = rms_norm(x, weight, EPS, residual)
    return result if isinstance(result, tuple) else (result,)


def reference(x, weight, residual):
    result = rms_norm_reference(x, weight, EPS, residual)
    return result if isinstance(result, tuple) else (result,)


def upcast(*tensors):
    return [None if t is None else t.float() for t in tensors]


def check_forward(x, weight, residual):
    ours = outputs(x, weight, residual)
    assert all(o.dtype == x.dtype and o.shape == x.shape for o in ours)
    if x.dtype == torch.float32:
        for got, want in zip(ours, reference(x, weight, residual)):
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
        return
    ref32 = reference(*upcast(x, weight, residual))
    low = reference(x, weight, residual)  # HF's arithmetic in x's dtype
    for got, want, same_precision in zip(ours, ref32, low):
        assert_within_twice_torch(got, want, same_precision)
    if residual is not None:  # new_residual: the same single rounding of x + residual as torch
        torch.testing.assert_close(ours[1], low[1], atol=0, rtol=0)


def grads(fn, x, weight, residual, grad_outs):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    results = fn(x, weight, residual)
    torch.autograd.backward(results, [g.to(r.dtype) for r, g in zip(results, grad_outs)])
    return [t.grad for t in (x, weight, residual) if t is not None]


def check_backward(x, weight, residual):
    grad_outs = [torch.randn(x.shape, device=x.device) for _ in range(1 if residual is None else 2)]
    ours = grads(outputs, x, weight, residual, grad_outs)
    assert [g.dtype for g in ours] == [t.dtype for t in (x, weight, residual) if t is not None]
    if x.dtype == torch.float32:
        for got, want in zip(ours, grads(reference, x, weight, residual, grad_outs)):
            torch.testing.assert_close(got, want, **GRAD_TOL)
        return
    ref32 = grads(reference, *upcast(x, weight, residual), grad_outs)
    low = grads(reference, x, weight, residual, grad_outs)
    for got, want, same_precision in zip(ours, ref32, low):
        assert_within_twice_torch(got, want, same_precision)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype,weight_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype, weight_dtype, with_residual):
    x, residual, weight = make_inputs(shape, dtype, weight_dtype)
    check_forward(x, weight, residual if with_residual else None)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype,weight_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_gradients_match_reference(shape, dtype, weight_dtype, with_residual):
    x, residual, weight = make_inputs(shape, dtype, weight_dtype)
    check_backward(x, weight, residual if with_residual else None)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fp16(with_residual):
    x, residual, weight = make_inputs((7, 123), torch.float16)
    check_forward(x, weight, residual if with_residual else None)
    check_backward(x, weight, residual if with_residual else None)


def test_non_contiguous_x():
    x, weight = torch.randn(64, 33).t(), torch.randn(64)  # rows 64 apart in memory
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(shape, dtype, with_residual):
    x, residual, weight = make_inputs(shape, dtype)
    residual = residual if with_residual else None
    with use_backend("triton"):
        check_forward(x, weight, residual)
        check_backward(x, weight, residual)


def test_gradcheck():
    # The kernels take fp32 at most, so finite differences need a large step and loose tolerances.
    x, residual, weight = (t.requires_grad_() for t in make_inputs((3, 17), torch.float32))
    gradcheck = dict(eps=1e-2, atol=2e-2, rtol=2e-2, nondet_tol=1e-5)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), (x, weight), **gradcheck)
    assert torch.autograd.gradcheck(lambda x, r, w: rms_norm(x, w, EPS, r), (x, residual, weight), **gradcheck)


def test_opcheck():
    x, residual, weight = make_inputs((5, 7, 33), torch.float32)
    ops = kernels()
    torch.library.opcheck(ops.rms_norm.default, (x.requires_grad_(), weight.requires_grad_(), EPS))
    torch.library.opcheck(ops.rms_norm_residual.default, (x, residual.requires_grad_(), weight, EPS))
    out, rstd = ops.rms_norm(x.detach(), weight.detach(), EPS)
    torch.library.opcheck(ops.rms_norm_backward.default, (torch.randn_like(out), x.detach(), weight.detach(), rstd))


@pytest.mark.parametrize("with_residual", [False, True])
def test_compiles_with_torch_compile(with_residual):
    x, residual, weight = make_inputs((4, 9, 64), torch.float32)
    residual = residual if with_residual else None
    fn = torch.compile(outputs, fullgraph=True)
    for got, want in zip(fn(x, weight, residual), reference(x, weight, residual)):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    grad_outs = [torch.randn_like(x) for _ in range(1 if residual is None else 2)]
    for got, want in zip(grads(fn, x, weight, residual, grad_outs), grads(reference, x, weight, residual, grad_outs)):
        torch.testing.assert_close(got, want, **GRAD_TOL)


@pytest.mark.parametrize(
    "x,residual,weight,match",
    [
        (torch.randint(0, 3, (2, 4)), None, torch.ones(4), "x must be float32, bfloat16 or float16"),
        (torch.tensor(1.0), None, torch.ones(1), "x must be at least 1-D"),
        (torch.randn(2, 0), None, torch.ones(0), "x must have a non-empty last dimension"),
        (torch.randn(2, 4), None, torch.ones(5), r"weight.size\(0\) must be 4"),
        (torch.randn(2, 4), None, torch.ones(1, 4), "weight must be 1-D"),
        (torch.randn(2, 4).bfloat16(), None, torch.ones(4).half(), "weight must be float32 or x's dtype"),
        (torch.randn(2, 4), torch.randn(2, 5), torch.ones(4), "residual must have x's shape"),
        (torch.randn(2, 4), torch.randn(2, 4).bfloat16(), torch.ones(4), "residual and x must have the same dtype"),
    ],
)
def test_bad_input_names_the_argument(x, residual, weight, match):
    with pytest.raises(RuntimeError, match=match):
        rms_norm(x, weight, EPS, residual)


def test_backward_bad_input_names_the_argument():
    x, weight = torch.randn(3, 8), torch.ones(8)
    backward = kernels().rms_norm_backward
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        backward(torch.randn(3, 7), x, weight, torch.ones(3))
    with pytest.raises(RuntimeError, match="rstd must have shape"):
        backward(torch.randn(3, 8), x, weight, torch.ones(4))
    with pytest.raises(RuntimeError, match="rstd must be Float"):
        backward(torch.randn(3, 8), x, weight, torch.ones(3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype,weight_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_reference(shape, dtype, weight_dtype, with_residual, backend):
    x, residual, weight = make_inputs(shape, dtype, weight_dtype, device="cuda")
    residual = residual if with_residual else None
    with use_backend(backend):
        check_forward(x, weight, residual)
        check_backward(x, weight, residual)
