from types import SimpleNamespace

import pytest
import torch
from helpers import TOLERANCES, assert_within_twice_torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from hybrid_engine.ops import (
    decode_attention,
    decode_attention_reference,
    kernels,
    prefill_attention,
    prefill_attention_reference,
    use_backend,
)

LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_lengths(B: int, T: int, device: str = "cpu", full: bool = False) -> torch.Tensor:
    """Lengths including T, 0 and 1 (where B allows); all T when `full`."""
    lens = torch.full((B,), T) if full else torch.randint(0, T + 1, (B,))
    lens[0] = T
    if B > 2 and not full:
        lens[1], lens[2] = 0, min(1, T)
    return lens.to(device)


def make_decode(B, Hq, Hkv, D, T_max, dtype, device="cpu"):
    # q is a strided view, as it comes out of a fused QKV projection.
    q = torch.randn(B, Hq + 2 * Hkv, D, device=device).to(dtype)[:, :Hq]
    k_cache = torch.randn(B, Hkv, T_max, D, device=device).to(dtype)
    v_cache = torch.randn(B, Hkv, T_max, D, device=device).to(dtype)
    return q, k_cache, v_cache, make_lengths(B, T_max, device)


def make_prefill(B, Hq, Hkv, D, T, dtype, device="cpu", full=False):
    # Transposed views of [B, T, H, D] projections, as a model produces them.
    q = torch.randn(B, T, Hq, D, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2)
    return q, k, v, make_lengths(B, T, device, full)


def fp32(*tensors):
    return [t.float() for t in tensors]


def hf_eager(q, k, v, allowed, scale):
    """Hugging Face's eager attention (in the inputs' dtype) with an additive mask from `allowed`
    [B, Tq, Tk]; rows that allow no key are zeroed. [B, H, Tq, D]."""
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)[:, None]
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    out, _ = eager_attention_forward(module, q, k, v, mask, scale)
    return out.transpose(1, 2).masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)


def decode_allowed(lens, T_max):
    return (torch.arange(T_max)[None] < lens[:, None])[:, None, :]  # (B, 1, T_max)


def prefill_allowed(lens, T):
    pos = torch.arange(T)
    real = pos[None] >= (T - lens)[:, None]
    return real[:, None, :] & (pos[:, None] >= pos[None, :])[None]  # (B, Tq, Tk)


def check_decode(out, q, k_cache, v_cache, lens, scale):
    ref = decode_attention_reference(*fp32(q, k_cache, v_cache), lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert (out[lens == 0] == 0).all()
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    else:
        allowed = decode_allowed(lens.cpu(), k_cache.shape[2]).to(q.device)
        assert_within_twice_torch(out, ref, hf_eager(q[:, :, None], k_cache, v_cache, allowed, scale)[:, :, 0])


def check_prefill(out, q, k, v, lens, scale):
    ref = prefill_attention_reference(*fp32(q, k, v), lens, scale)
    B, Hq, T, D = q.shape
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    padded = torch.arange(T, device=q.device)[None] < (T - lens)[:, None]  # (B, T)
    assert (out.transpose(1, 2)[padded] == 0).all()
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    else:
        assert_within_twice_torch(out, ref, hf_eager(q, k, v, prefill_allowed(lens.cpu(), T).to(q.device), scale))


# B, Hq, Hkv, D, T: lengths 1, 7, 123; head dims 64, 80, 128, 256 and the vector tails of 72 and
# 96; GQA ratios 1, 2, 4 and 8 (two head tiles); batch 1 and 5.
SHAPES = [
    (1, 1, 1, 64, 1),
    (5, 4, 4, 64, 7),
    (5, 8, 4, 80, 123),
    (1, 8, 2, 128, 123),
    (5, 8, 2, 72, 33),
    (5, 4, 1, 96, 70),
    (2, 16, 4, 128, 130),
    (1, 16, 2, 256, 40),
]


def test_decode_reference_matches_hf_eager():
    q, k_cache, v_cache, lens = make_decode(5, 8, 2, 64, 40, torch.float32)
    expected = hf_eager(q[:, :, None], k_cache, v_cache, decode_allowed(lens, 40), 0.125)[:, :, 0]
    torch.testing.assert_close(decode_attention_reference(q, k_cache, v_cache, lens, 0.125), expected)


def test_prefill_reference_matches_hf_eager():
    q, k, v, lens = make_prefill(5, 8, 2, 64, 40, torch.float32)
    expected = hf_eager(q, k, v, prefill_allowed(lens, 40), 0.125)
    torch.testing.assert_close(prefill_attention_reference(q, k, v, lens, 0.125), expected)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("B,Hq,Hkv,D,T", SHAPES)
def test_decode_kernel_matches_reference(B, Hq, Hkv, D, T, dtype):
    q, k_cache, v_cache, lens = make_decode(B, Hq, Hkv, D, T, dtype)
    check_decode(decode_attention(q, k_cache, v_cache, lens, D**-0.5), q, k_cache, v_cache, lens, D**-0.5)


@pytest.mark.parametrize("full", [False, True], ids=["ragged", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("B,Hq,Hkv,D,T", SHAPES)
def test_prefill_kernel_matches_reference(B, Hq, Hkv, D, T, dtype, full):
    # "full" batches take the SDPA route for bf16 on AMX machines, ragged ones the tiled kernel.
    q, k, v, lens = make_prefill(B, Hq, Hkv, D, T, dtype, full=full)
    check_prefill(prefill_attention(q, k, v, lens, D**-0.5), q, k, v, lens, D**-0.5)


@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("cache_dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,Hq,Hkv,D,T", SHAPES[:5])
def test_decode_low_precision_cache_under_fp32_q(B, Hq, Hkv, D, T, cache_dtype, backend):
    """A bf16/fp16 KV cache (generate's kv_dtype) under fp32 queries: the same as the fp32 reference over the
    cache's own values, to fp32 tolerance (the kernel widens each cached element exactly)."""
    q, k_cache, v_cache, lens = make_decode(B, Hq, Hkv, D, T, torch.float32)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    with use_backend(backend):
        out = decode_attention(q, k_cache, v_cache, lens, 0.1)
    assert out.dtype == torch.float32
    ref = decode_attention_reference(q, k_cache.float(), v_cache.float(), lens, 0.1)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


def test_int32_lengths_and_contiguous_q():
    q, k_cache, v_cache, lens = make_decode(5, 8, 2, 64, 20, torch.float32)
    out = decode_attention(q.contiguous(), k_cache, v_cache, lens.int(), 0.125)
    check_decode(out, q, k_cache, v_cache, lens, 0.125)
    q, k, v, lens = make_prefill(5, 8, 2, 64, 20, torch.float32)
    check_prefill(prefill_attention(q.contiguous(), k, v, lens.int(), 0.125), q, k, v, lens, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,T", [(5, 4, 2, 80, 7), (2, 8, 2, 72, 45)])
def test_triton_decode_matches_reference(B, Hq, Hkv, D, T, dtype):
    q, k_cache, v_cache, lens = make_decode(B, Hq, Hkv, D, T, dtype)
    with use_backend("triton"):
        out = decode_attention(q, k_cache, v_cache, lens, D**-0.5)
    check_decode(out, q, k_cache, v_cache, lens, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,T", [(5, 2, 1, 64, 7), (2, 4, 2, 80, 45)])
def test_triton_prefill_matches_reference(B, Hq, Hkv, D, T, dtype):
    q, k, v, lens = make_prefill(B, Hq, Hkv, D, T, dtype)
    with use_backend("triton"):
        out = prefill_attention(q, k, v, lens, D**-0.5)
    check_prefill(out, q, k, v, lens, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k_cache, v_cache, lens = make_decode(3, 4, 2, 64, 9, dtype)
    torch.library.opcheck(kernels().decode_attention.default, (q, k_cache, v_cache, lens, 0.125))
    q, k, v, lens = make_prefill(3, 4, 2, 64, 9, dtype)
    torch.library.opcheck(kernels().prefill_attention.default, (q, k, v, lens, 0.125))


def test_compiles_with_torch_compile():
    q, k_cache, v_cache, lens = make_decode(3, 4, 2, 64, 9, torch.float32)
    compiled = torch.compile(lambda *a: decode_attention(*a, 0.125), fullgraph=True)
    check_decode(compiled(q, k_cache, v_cache, lens), q, k_cache, v_cache, lens, 0.125)
    q, k, v, lens = make_prefill(3, 4, 2, 64, 9, torch.float32)
    compiled = torch.compile(lambda *a: prefill_attention(*a, 0.125), fullgraph=True)
    check_prefill(compiled(q, k, v, lens), q, k, v, lens, 0.125)


def decode_args(**change):
    args = dict(
        q=torch.randn(2, 4, 64),
        k_cache=torch.randn(2, 2, 8, 64),
        v_cache=torch.randn(2, 2, 8, 64),
        seq_lens=torch.tensor([8, 3]),
    )
    return {**args, **change}


def prefill_args(**change):
    args = dict(q=torch.randn(2, 4, 8, 64), k=torch.randn(2, 2, 8, 64), v=torch.randn(2, 2, 8, 64))
    return {**args, "seq_lens": torch.tensor([8, 3]), **change}


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 64)), "q must be 3-D"),
        (dict(k_cache=torch.randn(2, 2, 8)), "k_cache must be 4-D"),
        (dict(k_cache=torch.randn(2, 2, 8, 32)), r"k_cache.size\(3\) must be 64"),
        (dict(v_cache=torch.randn(2, 2, 9, 64)), "v_cache must have shape"),
        (dict(k_cache=torch.randn(2, 3, 8, 64), v_cache=torch.randn(2, 3, 8, 64)), "multiple of k_cache heads"),
        (dict(q=torch.randn(2, 4, 300), k_cache=torch.randn(2, 2, 8, 300), v_cache=torch.randn(2, 2, 8, 300)), "256"),
        (dict(q=torch.randint(0, 3, (2, 4, 64))), "q must be float32"),
        (dict(v_cache=torch.randn(2, 2, 8, 64).bfloat16()), "v_cache and k_cache must have the same dtype"),
        (dict(q=torch.randn(2, 4, 64).bfloat16()), "k_cache must have q's dtype, or bfloat16/float16 under float32"),
        (dict(seq_lens=torch.tensor([8.0, 3.0])), "seq_lens must be int32 or int64"),
        (dict(seq_lens=torch.tensor([8])), r"seq_lens.size\(0\) must be 2"),
        (dict(seq_lens=torch.tensor([9, 3])), r"seq_lens\[0\] = 9 is outside \[0, T_max = 8\]"),
        (dict(seq_lens=torch.tensor([8, -1])), r"seq_lens\[1\] = -1"),
        (dict(k_cache=torch.randn(2, 2, 64, 8).transpose(2, 3)), "k_cache must be contiguous"),
        (dict(q=torch.randn(2, 64, 4).transpose(1, 2)), "q must be contiguous in its last dimension"),
    ],
)
def test_decode_bad_input_names_the_argument(change, match):
    with pytest.raises(RuntimeError, match=match):
        decode_attention(**decode_args(**change), scale=0.125)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 4, 64)), "q must be 4-D"),
        (dict(k=torch.randn(2, 2, 7, 64)), r"k.size\(2\) must be 8"),
        (dict(v=torch.randn(2, 2, 8, 32)), "v must have shape"),
        (dict(k=torch.randn(2, 3, 8, 64), v=torch.randn(2, 3, 8, 64)), "multiple of k heads"),
        (dict(k=torch.randn(2, 2, 8, 64).half()), "k and q must have the same dtype"),
        (dict(q=torch.randn(2, 4, 8, 64).double()), "q must be float32"),
        (dict(seq_lens=torch.tensor([9, 3])), r"seq_lens\[0\] = 9 is outside \[0, T = 8\]"),
        (dict(v=torch.randn(2, 2, 64, 8).transpose(2, 3)), "v must be contiguous in its last dimension"),
    ],
)
def test_prefill_bad_input_names_the_argument(change, match):
    with pytest.raises(RuntimeError, match=match):
        prefill_attention(**prefill_args(**change), scale=0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,T", [(5, 8, 2, 72, 123), (2, 16, 4, 128, 300), (1, 4, 4, 256, 7)])
def test_cuda_matches_reference(backend, dtype, B, Hq, Hkv, D, T):
    q, k_cache, v_cache, lens = make_decode(B, Hq, Hkv, D, T, dtype, device="cuda")
    with use_backend(backend):
        out = decode_attention(q, k_cache, v_cache, lens, D**-0.5)
    check_decode(out, q, k_cache, v_cache, lens, D**-0.5)
    q, k, v, lens = make_prefill(B, Hq, Hkv, D, T, dtype, device="cuda")
    with use_backend(backend):
        out = prefill_attention(q, k, v, lens, D**-0.5)
    check_prefill(out, q, k, v, lens, D**-0.5)
