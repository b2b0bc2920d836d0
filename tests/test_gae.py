import pytest
import torch
from helpers import TOLERANCES

from hybrid_engine.ops import gae, gae_reference, kernels, use_backend

GAMMA, LAM = 0.99, 0.95


def make_inputs(B: int, T: int, dtype: torch.dtype, device: str = "cpu"):
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    # Response lengths include 0, 1 and full length: mask contiguous from each sequence's start.
    lengths = torch.randint(0, T + 1, (B,), device=device)
    lengths[0] = T
    if B > 1:
        lengths[1] = min(1, T)
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).to(dtype)
    return rewards, values, mask


def plain_loop_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one sequence and one step at a time, for checking the vectorised reference."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values.float()) * mask.float()


@pytest.mark.parametrize("B,T", [(1, 1), (5, 7), (3, 123)])
def test_reference_matches_plain_loop(B, T):
    r, v, m = make_inputs(B, T, torch.float32)
    adv, ret = gae_reference(r, v, m, GAMMA, LAM)
    adv_loop, ret_loop = plain_loop_gae(r, v, m, GAMMA, LAM)
    torch.testing.assert_close(adv, adv_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_loop, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (5, 7), (5, 123), (64, 512)])
def test_kernel_matches_reference(B, T, dtype):
    r, v, m = make_inputs(B, T, dtype)
    adv, ret = gae(r, v, m, GAMMA, LAM)
    adv_ref, ret_ref = gae_reference(r, v, m, GAMMA, LAM)
    assert adv.dtype == ret.dtype == torch.float32
    # The kernel accumulates in fp32 like the reference, so bf16 inputs only change the inputs.
    torch.testing.assert_close(adv, adv_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ret, ret_ref, **TOLERANCES[torch.float32])
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


@pytest.mark.parametrize("B,T", [(1, 1), (5, 7), (33, 19)])
def test_triton_matches_reference(B, T):
    r, v, m = make_inputs(B, T, torch.float32)
    with use_backend("triton"):
        adv, ret = gae(r, v, m, GAMMA, LAM)
    adv_ref, ret_ref = gae_reference(r, v, m, GAMMA, LAM)
    torch.testing.assert_close(adv, adv_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ret, ret_ref, **TOLERANCES[torch.float32])


def test_opcheck():
    r, v, m = make_inputs(5, 7, torch.float32)
    torch.library.opcheck(kernels().gae.default, (r, v, m, GAMMA, LAM))


def test_compiles_with_torch_compile():
    r, v, m = make_inputs(4, 9, torch.float32)
    compiled = torch.compile(lambda r, v, m: gae(r, v, m, GAMMA, LAM), fullgraph=True)
    torch.testing.assert_close(compiled(r, v, m)[0], gae_reference(r, v, m, GAMMA, LAM)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(5), torch.randn(5), torch.ones(5)), "rewards must be 2-D"),
        ((torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, 3)), "values must have shape"),
        ((torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64)), "mask and rewards must have"),
        ((torch.randint(0, 3, (2, 3)), torch.randn(2, 3), torch.ones(2, 3)), "rewards must be float32"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        gae(*args, GAMMA, LAM)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
def test_cuda_matches_reference(backend):
    r, v, m = make_inputs(37, 129, torch.float32, device="cuda")
    with use_backend(backend):
        adv, ret = gae(r, v, m, GAMMA, LAM)
    adv_ref, ret_ref = gae_reference(r, v, m, GAMMA, LAM)
    torch.testing.assert_close(adv, adv_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ret, ret_ref, **TOLERANCES[torch.float32])
