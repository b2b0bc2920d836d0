import pytest
import torch
from helpers import TOLERANCES, assert_within_twice_torch

from hybrid_engine.ops import kernels, token_logprobs, token_logprobs_reference, use_backend

IGNORE = -100


def make_inputs(N: int, V: int, H: int, dtype: torch.dtype, device: str = "cpu", ignore_every: int = 3):
    hidden = torch.randn(N, H, device=device).to(dtype)
    # Logits of a few units, so that distributions range from peaked to flat.
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    tokens = torch.randint(0, V, (N,), device=device)
    tokens[::ignore_every] = IGNORE
    return hidden, weight, tokens


def evaluate(op, hidden, weight, grads=None):
    """op(hidden, weight) -> tuple of outputs; with grads (one per output) also (grad_hidden, grad_weight)."""
    h = hidden.detach().requires_grad_(grads is not None)
    w = weight.detach().requires_grad_(grads is not None)
    outs = op(h, w)
    if grads is None:
        return outs
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(grads, outs)])
    return (*outs, h.grad, w.grad)


def assert_matches(ours, ref64, same_precision, dtype, is_output):
    if dtype == torch.float32 and is_output:
        torch.testing.assert_close(ours.double(), ref64, **TOLERANCES[torch.float32])
    # Gradients (sums over N or V of GEMM products) carry the GEMM's own fp32 rounding, so every
    # dtype's gradients, and the outputs of the low-precision dtypes, follow the 2x rule, with a
    # floor of the fp32 tolerance or half an ulp of the result's dtype, relative to the largest
    # value: the kernels recompute probabilities from a saved fp32 log-sum-exp (~1 ulp of the
    # logits' size), and every implementation rounds bf16 gradients to bf16 (on a few dozen
    # elements the largest such rounding varies by more than 2x).
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    floor = max(TOLERANCES[torch.float32]["rtol"], torch.finfo(ours.dtype).eps / 2) * scale
    assert_within_twice_torch(ours, ref64, same_precision, floor=floor)


def check_against_oracle(backend, N, V, H, dtype, temperature, with_grads, entropy=True, device="cpu"):
    """Our op on `backend` against the fp64 reference (the oracle), with the reference run in the
    inputs' own dtype as the same-precision torch implementation of the 2x error rule."""
    hidden, weight, tokens = make_inputs(N, V, H, dtype, device)
    n_out = 2 if entropy else 1
    grads = tuple(torch.randn(N, device=device) for _ in range(n_out)) if with_grads else None

    def ours(h, w):
        with use_backend(backend):
            out = token_logprobs(h, w, tokens, temperature, return_entropy=entropy)
        return out if entropy else (out,)

    def ref(h, w):
        out = token_logprobs_reference(h, w, tokens, temperature, return_entropy=entropy)
        return out if entropy else (out,)

    got = evaluate(ours, hidden, weight, grads)
    oracle = evaluate(ref, hidden.double(), weight.double(), grads)
    same = evaluate(ref, hidden, weight, grads)
    assert all(out.dtype == torch.float32 for out in got[:n_out])
    for k, (o, r, s) in enumerate(zip(got, oracle, same)):
        assert_matches(o, r, s, dtype, is_output=k < n_out)


SHAPES = [(N, V, H) for N in (1, 7, 123) for V in (1, 37, 1001) for H in (16, 80)]


def test_reference_matches_cross_entropy_and_categorical():
    hidden, weight, tokens = make_inputs(7, 37, 16, torch.float32)
    lp, ent = token_logprobs_reference(hidden, weight, tokens, 0.7, return_entropy=True)
    logits = hidden @ weight.T / 0.7
    ce = torch.nn.functional.cross_entropy(logits, tokens, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(lp, -ce)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy())


@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,H", SHAPES)
def test_forward_matches_reference(N, V, H, dtype, temperature, entropy):
    check_against_oracle("kernels", N, V, H, dtype, temperature, with_grads=False, entropy=entropy)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,H", [(1, 1, 16), (1, 37, 80), (7, 37, 16), (7, 1001, 80), (123, 1001, 16), (123, 37, 80)])
@pytest.mark.parametrize("entropy", [True, False])
def test_gradients_match_reference(N, V, H, dtype, temperature, entropy):
    # Without entropy the ignored rows (every third) skip the GEMMs in both passes.
    check_against_oracle("kernels", N, V, H, dtype, temperature, with_grads=True, entropy=entropy)


@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_blocks_in_both_passes(dtype, entropy):
    # 400 x 32003 logits span two row blocks in the forward and two vocabulary blocks (the second
    # one partial) in the backward, also once the ignored rows are left out, with target tokens on
    # both sides of the block boundary.
    check_against_oracle("kernels", 400, 32003, 16, dtype, 0.7, with_grads=True, entropy=entropy)


def test_float16():
    check_against_oracle("kernels", 7, 1001, 80, torch.float16, 1.0, with_grads=True)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_return_value_and_single_output_gradient(return_entropy):
    hidden, weight, tokens = make_inputs(5, 37, 16, torch.float32)
    h = hidden.clone().requires_grad_()
    out = token_logprobs(h, weight, tokens, 1.0, return_entropy=return_entropy)
    assert isinstance(out, tuple) == return_entropy
    # Only one of the outputs reaches the loss: the other's gradient is absent, not zero-filled.
    (out[1] if return_entropy else out).sum().backward()
    h_ref = hidden.double().requires_grad_()
    lp, ent = token_logprobs_reference(h_ref, weight.double(), tokens, 1.0, return_entropy=True)
    (ent if return_entropy else lp).sum().backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, **TOLERANCES[torch.float32])


def test_ignored_tokens_give_zero_logprob_and_no_gradient():
    hidden, weight, tokens = make_inputs(9, 37, 16, torch.float32, ignore_every=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = token_logprobs(h, w, tokens)
    ignored = tokens == IGNORE
    assert (lp[ignored] == 0).all() and (lp[~ignored] < 0).all()
    lp.sum().backward()
    assert (h.grad[ignored] == 0).all() and (h.grad[~ignored] != 0).any()
    all_ignored = torch.full_like(tokens, IGNORE)
    w.grad = None
    token_logprobs(h, w, all_ignored).sum().backward()
    assert (w.grad == 0).all()


def test_strided_hidden_and_empty_batch():
    hidden, weight, tokens = make_inputs(6, 37, 16, torch.float32)
    strided = hidden.t().contiguous().t()  # same values, column-major
    torch.testing.assert_close(token_logprobs(strided, weight, tokens), token_logprobs(hidden, weight, tokens))
    empty = token_logprobs(hidden[:0], weight, tokens[:0], return_entropy=True)
    assert empty[0].shape == empty[1].shape == (0,)


def test_opcheck():
    hidden, weight, tokens = make_inputs(5, 37, 16, torch.float32)
    for with_entropy in (False, True):
        args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), tokens, 0.7, with_entropy)
        torch.library.opcheck(kernels().token_logprobs.default, args)
    lp, ent, lse = kernels().token_logprobs(hidden, weight, tokens, 0.7, True)
    for grad_entropy in (None, torch.randn(5)):
        args = (torch.randn(5), grad_entropy, hidden, weight, tokens, lse, ent, 0.7)
        torch.library.opcheck(kernels().token_logprobs_backward.default, args)


def test_compiles_with_torch_compile():
    hidden, weight, tokens = make_inputs(6, 37, 16, torch.float32)
    compiled = torch.compile(lambda h, w, t: token_logprobs(h, w, t, 0.7, return_entropy=True), fullgraph=True)
    h = hidden.clone().requires_grad_()
    lp, ent = compiled(h, weight, tokens)
    (lp.sum() + ent.sum()).backward()
    h_ref = hidden.clone().requires_grad_()
    lp_ref, ent_ref = token_logprobs_reference(h_ref, weight, tokens, 0.7, return_entropy=True)
    (lp_ref.sum() + ent_ref.sum()).backward()
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "N,V,H,dtype,temperature,entropy",
    [
        (1, 1, 16, torch.float32, 1.0, True),
        (7, 37, 16, torch.float32, 0.7, True),
        (7, 37, 16, torch.bfloat16, 1.0, False),
        (20, 37, 80, torch.float32, 0.7, False),
        (20, 100, 16, torch.bfloat16, 0.7, True),
    ],
)
def test_triton_matches_reference(N, V, H, dtype, temperature, entropy):
    # Few tiles in total: the interpreter costs milliseconds per program instance.
    check_against_oracle("triton", N, V, H, dtype, temperature, with_grads=True, entropy=entropy)


def test_triton_forward_long_vocabulary():
    check_against_oracle("triton", 5, 1001, 16, torch.float32, 0.7, with_grads=False)


def test_triton_rejects_out_of_range_tokens():
    hidden, weight, tokens = make_inputs(3, 37, 16, torch.float32)
    tokens[1] = 37
    with use_backend("triton"), pytest.raises(ValueError, match="out of range"):
        token_logprobs(hidden, weight, tokens)


def bad(**overrides):
    hidden, weight, tokens = make_inputs(4, 37, 16, torch.float32)
    args = dict(hidden=hidden, weight=weight, tokens=tokens, temperature=1.0)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args,match",
    [
        (bad(hidden=torch.randn(16)), "hidden must be 2-D"),
        (bad(weight=torch.randn(37, 15)), r"weight.size\(1\) must be 16"),
        (bad(weight=torch.randn(0, 16)), "weight must have at least one row"),
        (bad(tokens=torch.zeros(5, dtype=torch.int64)), "tokens must have shape"),
        (bad(tokens=torch.zeros(4, dtype=torch.int32)), "tokens must be Long"),
        (bad(hidden=torch.randn(4, 16).bfloat16()), "weight and hidden must have the same dtype"),
        (bad(hidden=torch.randn(4, 16).double(), weight=torch.randn(37, 16).double()), "hidden must be float32"),
        (bad(temperature=0.0), "temperature must be > 0"),
        (bad(tokens=torch.tensor([0, 1, 37, 2])), r"tokens\[2\] = 37 is out of range"),
        (bad(tokens=torch.tensor([0, -1, 3, 2])), r"tokens\[1\] = -1 is out of range"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        token_logprobs(**args)


def test_backward_bad_input_names_the_argument():
    hidden, weight, tokens = make_inputs(4, 37, 16, torch.float32)
    lp, ent, lse = kernels().token_logprobs(hidden, weight, tokens, 1.0, True)
    with pytest.raises(RuntimeError, match="grad_logprobs must have shape"):
        kernels().token_logprobs_backward(torch.randn(3), None, hidden, weight, tokens, lse, ent, 1.0)
    with pytest.raises(RuntimeError, match="grad_entropy must have shape"):
        kernels().token_logprobs_backward(
            torch.randn(4), torch.randn(2), hidden, weight, tokens, lse, ent, 1.0
        )
    with pytest.raises(RuntimeError, match="lse must be Float"):
        kernels().token_logprobs_backward(
            torch.randn(4), None, hidden, weight, tokens, lse.double(), ent, 1.0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,H", [(1, 1, 16), (123, 1001, 80), (300, 32003, 128)])
@pytest.mark.parametrize("entropy", [True, False])
def test_cuda_matches_reference(backend, N, V, H, dtype, entropy):
    check_against_oracle(backend, N, V, H, dtype, 0.7, with_grads=True, entropy=entropy, device="cuda")
