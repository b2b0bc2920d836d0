import pytest
import torch
from helpers import TOLERANCES, assert_within_twice_torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hybrid_engine.ops import kernels, rotary_append_kv, rotary_append_kv_reference, rotary_tables, use_backend

T_MAX = 160

# (B, S, Hq, Hkv, D, R): decode (S = 1) and prefill steps, GQA ratios 1, 2, 4, head dims 64, 80, 128,
# and partial rotary (R < D, as in GPT-NeoX / Phi).
SHAPES = [
    (1, 1, 4, 4, 64, 64),
    (5, 1, 8, 4, 128, 128),
    (5, 7, 8, 2, 80, 80),
    (2, 123, 4, 1, 64, 32),
    (1, 7, 2, 2, 128, 128),
]
# Few tokens: the Triton interpreter pays per program, and each program is one token.
TRITON_SHAPES = [(1, 1, 4, 4, 64, 64), (5, 1, 8, 4, 128, 128), (5, 7, 8, 2, 80, 80), (2, 5, 4, 1, 64, 32)]


def inv_freq(R: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))


def make_case(B, S, Hq, Hkv, D, R, dtype, rope=True, device="cpu"):
    """A fused QKV output, random caches and positions: left-padded prefill or a decode step."""
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, device=device).to(dtype)
    k_cache = torch.randn(B, Hkv, T_MAX, D, device=device).to(dtype)
    v_cache = torch.randn(B, Hkv, T_MAX, D, device=device).to(dtype)
    if S == 1:
        positions = torch.randint(0, T_MAX, (B, 1), device=device)
    else:
        lengths = torch.randint(1, S + 1, (B,), device=device)
        lengths[0] = S
        mask = (torch.arange(S, device=device)[None] >= S - lengths[:, None]).long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    cos, sin = rotary_tables(inv_freq(R).to(device), T_MAX) if rope else (None, None)
    return qkv, k_cache, v_cache, positions, cos, sin


def split(qkv, Hq, Hkv, D):
    """q, k, v as strided views into the fused projection, as the attention layer produces them."""
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.unflatten(-1, (Hq, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))


def run(fn, qkv, k_cache, v_cache, positions, cos, sin, heads):
    """Applies fn to copies; returns the fused QKV buffer and caches after the call."""
    qkv, k_cache, v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    fn(*split(qkv, *heads), k_cache, v_cache, positions, cos, sin)
    return qkv, k_cache, v_cache


def low_precision_torch(qkv, k_cache, v_cache, positions, cos, sin, heads):
    """HF's own arithmetic in the inputs' dtype (cos/sin rounded to it too): the bar for bf16."""
    qkv, k_cache, v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    q, k, v = split(qkv, *heads)
    pos = positions.long()
    b, s = torch.nonzero(pos >= 0, as_tuple=True)
    p = pos[b, s]
    if cos is not None:
        c = torch.cat((cos[p], cos[p]), -1)[:, None].to(qkv.dtype)
        sn = torch.cat((sin[p], sin[p]), -1)[:, None].to(qkv.dtype)
        R = c.shape[-1]
        for x in (q, k):
            xr = x[b, s, :, :R]
            x1, x2 = xr.chunk(2, dim=-1)
            x[b, s, :, :R] = xr * c + torch.cat((-x2, x1), -1) * sn
    k_cache[b, :, p] = k[b, s]
    v_cache[b, :, p] = v[b, s]
    return qkv, k_cache, v_cache


def check_against_reference(ours, case, heads, dtype):
    ref = run(rotary_append_kv_reference, *case, heads)
    if dtype == torch.float32:
        for got, want in zip(ours, ref):
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
        return
    fp32_case = [x.float() if x is not None and x.is_floating_point() else x for x in case]
    ref32 = run(rotary_append_kv_reference, *fp32_case, heads)
    torch_low = low_precision_torch(*case, heads)
    for got, want, low in zip(ours, ref32, torch_low):
        assert_within_twice_torch(got, want, low)
    torch.testing.assert_close(ours[2], ref[2], atol=0, rtol=0)  # v_cache: a copy, exact


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,Hq,Hkv,D,R", SHAPES)
def test_kernel_matches_reference(B, S, Hq, Hkv, D, R, dtype, rope):
    case = make_case(B, S, Hq, Hkv, D, R, dtype, rope)
    ours = run(rotary_append_kv, *case, (Hq, Hkv, D))
    check_against_reference(ours, case, (Hq, Hkv, D), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,Hq,Hkv,D,R", TRITON_SHAPES)
def test_triton_matches_reference(B, S, Hq, Hkv, D, R, dtype):
    case = make_case(B, S, Hq, Hkv, D, R, dtype)
    with use_backend("triton"):
        ours = run(rotary_append_kv, *case, (Hq, Hkv, D))
    check_against_reference(ours, case, (Hq, Hkv, D), dtype)


@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,Hq,Hkv,D,R", TRITON_SHAPES)
def test_low_precision_cache_under_fp32_q(B, S, Hq, Hkv, D, R, cache_dtype, backend):
    """fp32 q, k, v written to a bf16/fp16 cache (generate's kv_dtype): q and k as in the fp32 case, the cached
    rows the reference's fp32 rows rounded once (a last-bit fp32 difference may flip that rounding: one unit of
    the cache dtype's last place), v's exactly."""
    qkv, k_cache, v_cache, positions, cos, sin = make_case(B, S, Hq, Hkv, D, R, torch.float32)
    case = (qkv, k_cache.to(cache_dtype), v_cache.to(cache_dtype), positions, cos, sin)
    with use_backend(backend):
        ours = run(rotary_append_kv, *case, (Hq, Hkv, D))
    ref = run(rotary_append_kv_reference, *case, (Hq, Hkv, D))
    torch.testing.assert_close(ours[0], ref[0], **TOLERANCES[torch.float32])
    assert ours[1].dtype == ours[2].dtype == cache_dtype
    torch.testing.assert_close(ours[1], ref[1], **TOLERANCES[cache_dtype])
    torch.testing.assert_close(ours[2], ref[2], atol=0, rtol=0)


def test_fp16_and_int32_positions():
    case = list(make_case(3, 7, 4, 2, 64, 64, torch.float16))
    case[3] = case[3].int()
    ours = run(rotary_append_kv, *case, (4, 2, 64))
    ref = run(rotary_append_kv_reference, *case, (4, 2, 64))
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float16])


def test_pads_and_other_slots_untouched():
    qkv, k_cache, v_cache, positions, cos, sin = make_case(2, 7, 4, 2, 64, 64, torch.float32)
    positions[1, :3] = -1
    out_qkv, out_k, out_v = run(rotary_append_kv, qkv, k_cache, v_cache, positions, cos, sin, (4, 2, 64))
    pads = positions < 0
    torch.testing.assert_close(out_qkv[pads], qkv[pads], atol=0, rtol=0)
    written = torch.zeros(2, T_MAX, dtype=torch.bool)
    for b in range(2):
        written[b, positions[b][positions[b] >= 0]] = True
    for out, before in ((out_k, k_cache), (out_v, v_cache)):
        torch.testing.assert_close(out.transpose(1, 2)[~written], before.transpose(1, 2)[~written], atol=0, rtol=0)


def hf_rotary(config: LlamaConfig, positions: torch.Tensor):
    emb = LlamaRotaryEmbedding(config)
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), positions.clamp(min=0))
    return emb, cos, sin


@pytest.mark.parametrize("backend", ["reference", "kernels", "triton"])
@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        # YaRN scales cos/sin by attention_scaling != 1.
        {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    ],
)
def test_matches_hugging_face_llama(rope_parameters, backend):
    B, S, Hq, Hkv, D = 2, 9, 4, 2, 64
    config = LlamaConfig(
        hidden_size=Hq * D,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=D,
        max_position_embeddings=T_MAX,
        rope_parameters=rope_parameters,
    )
    qkv, k_cache, v_cache, positions, _, _ = make_case(B, S, Hq, Hkv, D, D, torch.float32)
    emb, hf_cos, hf_sin = hf_rotary(config, positions)
    q, k, v = split(qkv, Hq, Hkv, D)
    # HF's layout is [B, H, S, D]; its cos/sin are [B, S, D].
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    cos, sin = rotary_tables(emb.inv_freq, T_MAX, emb.attention_scaling)
    with use_backend(backend):
        out_qkv, out_k, _ = run(rotary_append_kv, qkv, k_cache, v_cache, positions, cos, sin, (Hq, Hkv, D))
    out_q, out_kk, _ = split(out_qkv, Hq, Hkv, D)
    live = positions >= 0
    torch.testing.assert_close(out_q[live], q_hf.transpose(1, 2)[live], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_kk[live], k_hf.transpose(1, 2)[live], atol=1e-5, rtol=1e-5)
    b, s = torch.nonzero(live, as_tuple=True)
    torch.testing.assert_close(out_k[b, :, positions[b, s]], k_hf.transpose(1, 2)[b, s], atol=1e-5, rtol=1e-5)


def test_rotary_tables_match_hugging_face():
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=T_MAX)
    positions = torch.arange(T_MAX)[None]
    emb, hf_cos, hf_sin = hf_rotary(config, positions)
    cos, sin = rotary_tables(emb.inv_freq, T_MAX, emb.attention_scaling)
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], atol=1e-6, rtol=0)


def test_opcheck():
    qkv, k_cache, v_cache, positions, cos, sin = make_case(2, 5, 4, 2, 64, 64, torch.float32)
    q, k, v = (x.contiguous() for x in split(qkv, 4, 2, 64))
    torch.library.opcheck(
        kernels().rotary_append_kv.default, (q, k, v, k_cache, v_cache, positions, cos, sin)
    )
    torch.library.opcheck(
        kernels().rotary_append_kv.default, (q, k, v, k_cache, v_cache, positions, None, None)
    )


def test_compiles_with_torch_compile():
    qkv, k_cache, v_cache, positions, cos, sin = make_case(2, 5, 4, 2, 64, 64, torch.float32)

    def step(qkv, k_cache, v_cache):
        rotary_append_kv(*split(qkv, 4, 2, 64), k_cache, v_cache, positions, cos, sin)

    eager = [t.clone() for t in (qkv, k_cache, v_cache)]
    step(*eager)
    compiled = [t.clone() for t in (qkv, k_cache, v_cache)]
    torch.compile(step, fullgraph=True)(*compiled)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def bad_inputs():
    qkv, kc, vc, pos, cos, sin = make_case(2, 3, 4, 2, 64, 64, torch.float32)
    q, k, v = split(qkv, 4, 2, 64)
    good = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, positions=pos, cos=cos, sin=sin)
    big = pos.clone()
    big[0, 0] = T_MAX
    short_tables = (cos[:2], sin[:2])  # the first sequence reaches position 2
    return [
        (dict(q=q[0]), "q must be 4-D"),
        (dict(k=k[:, :2]), "k must have shape"),
        (dict(v=v[..., :32]), "v must have shape"),
        (dict(k_cache=kc[:1]), "k_cache must have shape"),
        (dict(v_cache=vc[:, :, :8]), "v_cache must have shape"),
        (dict(k_cache=kc.transpose(2, 3).contiguous().transpose(2, 3)), "k_cache must be contiguous"),
        (dict(positions=pos.float()), "positions must be int32 or int64"),
        (dict(positions=pos[:, :2]), "positions must have shape"),
        (dict(k=k.double()), "k and q must have the same dtype"),
        (dict(v_cache=vc.half()), "v_cache and k_cache must have the same dtype"),
        (dict(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16()), "k_cache must have q's dtype, or bfloat16/float16"),
        (dict(q=q.transpose(2, 3).contiguous().transpose(2, 3)), "q must be contiguous in its last dimension"),
        (dict(sin=None), "cos and sin must be given together"),
        (dict(cos=cos.double()), "cos must be Float"),
        (dict(cos=cos[:, :40].repeat(1, 2), sin=sin[:, :40].repeat(1, 2)), "cos must have R/2 columns"),
        (dict(sin=sin[:, :16]), "sin must have shape"),
        (dict(positions=big), "past the cache"),
        (dict(cos=short_tables[0], sin=short_tables[1]), "past the rotary tables"),
    ], good


@pytest.mark.parametrize("case", range(len(bad_inputs()[0])))
def test_bad_input_names_the_argument(case):
    cases, good = bad_inputs()
    override, match = cases[case]
    args = {**good, **override}
    before = [t.clone() for t in (good["q"], good["k"], good["k_cache"], good["v_cache"])]
    with pytest.raises(RuntimeError, match=match):
        rotary_append_kv(**args)
    # A rejected call writes nothing.
    for t, b in zip((good["q"], good["k"], good["k_cache"], good["v_cache"]), before):
        assert torch.equal(t, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,Hq,Hkv,D,R", SHAPES)
def test_cuda_matches_reference(B, S, Hq, Hkv, D, R, dtype, backend):
    case = make_case(B, S, Hq, Hkv, D, R, dtype, device="cuda")
    with use_backend(backend):
        ours = run(rotary_append_kv, *case, (Hq, Hkv, D))
    check_against_reference(ours, case, (Hq, Hkv, D), dtype)
