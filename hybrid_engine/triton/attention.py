"""decode_attention and prefill_attention as Triton kernels (flash-attention style online softmax).

decode: one program per (sequence, kv head) holds the group's query heads as the rows of one tile,
so each key/value block is loaded once per group. prefill: one program per (query block, sequence,
query head) sweeps the key blocks from the sequence's first real token to the block's last query.
Products run in fp32 with IEEE precision (no TF32) to match the fp32 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q, k, v, lens, out,
    q_sb, q_sh, Hq, Hkv, T_max, D, G, scale,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: caches exceed 2^31 elements
    kvh = tl.program_id(1)
    L = tl.load(lens + b)
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    heads = kvh * G + hs
    hd_mask = (hs < G)[:, None] & (ds < D)[None, :]
    qv = tl.load(q + b * q_sb + heads[:, None] * q_sh + ds[None, :], mask=hd_mask, other=0.0).to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    base = (b * Hkv + kvh) * T_max * D
    for start in range(0, L, BLOCK_N):
        ns = start + tl.arange(0, BLOCK_N)
        nd_mask = (ns < L)[:, None] & (ds < D)[None, :]
        offs = base + ns[:, None] * D + ds[None, :]
        kt = tl.load(k + offs, mask=nd_mask, other=0.0).to(tl.float32)
        s = tl.dot(qv, tl.trans(kt), input_precision="ieee") * scale  # (BLOCK_H, BLOCK_N)
        s = tl.where((ns < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block holds at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        vt = tl.load(v + offs, mask=nd_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        m = m_new
    o = tl.where(denom[:, None] > 0, acc / tl.where(denom > 0, denom, 1.0)[:, None], 0.0)  # empty sequence -> 0
    tl.store(out + (b * Hq + heads[:, None]) * D + ds[None, :], o.to(out.dtype.element_ty), mask=hd_mask)


@triton.jit
def _prefill_kernel(
    q, k, v, lens, out,
    qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, Hq, T, D, G, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: activations may exceed 2^31 elements
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    s0 = T - tl.load(lens + b)  # first real position
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    qv = tl.load(
        q + b * qs0 + h * qs1 + rows[:, None] * qs2 + ds[None, :],
        mask=(rows < T)[:, None] & (ds < D)[None, :],
        other=0.0,
    ).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, T)  # keys after the block's last query are future
    for start in range(s0, hi, BLOCK_N):
        ns = start + tl.arange(0, BLOCK_N)
        nd_mask = (ns < hi)[:, None] & (ds < D)[None, :]
        kt = tl.load(k + b * ks0 + kvh * ks1 + ns[:, None] * ks2 + ds[None, :], mask=nd_mask, other=0.0)
        s = tl.dot(qv, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
        visible = (ns[None, :] <= rows[:, None]) & (ns < hi)[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Rows before s0 (padding) see no key: keep their max finite so no NaN appears.
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        vt = tl.load(v + b * vs0 + kvh * vs1 + ns[:, None] * vs2 + ds[None, :], mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        m = m_new
    o = tl.where(denom[:, None] > 0, acc / tl.where(denom > 0, denom, 1.0)[:, None], 0.0)  # padded rows -> 0
    tl.store(
        out + ((b * Hq + h) * T + rows[:, None]) * D + ds[None, :],
        o.to(out.dtype.element_ty),
        mask=(rows < T)[:, None] & (ds < D)[None, :],
    )


def _check(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, limit: int,
           cache: bool = False) -> None:
    """The contract checks of the C++ ops, raised as ValueError (the kernels would read out of bounds). With
    `cache` (decode), k and v may also be bf16/fp16 under fp32 q."""
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: shapes of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    narrow_cache = cache and q.dtype == torch.float32 and k.dtype in (torch.bfloat16, torch.float16)
    if k.dtype != v.dtype or not (q.dtype == k.dtype or narrow_cache) or q.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: q, k, v must share one of float32, bfloat16, float16 (or a bf16/fp16 cache under "
                         f"fp32 q), got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or q.shape[-1] > 256:
        raise ValueError(f"{name}: head dims must be contiguous and at most 256")
    if seq_lens.shape != (q.shape[0],) or seq_lens.numel() and (seq_lens.min() < 0 or seq_lens.max() > limit):
        raise ValueError(f"{name}: seq_lens must be [B] with values in [0, {limit}], got {seq_lens.tolist()}")


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Triton decode attention with the contract of hybrid_engine.ops.decode_attention."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"decode_attention: q must be [B, Hq, D] and k_cache [B, Hkv, T_max, D], got {q.shape}")
    _check("decode_attention", q, k_cache, v_cache, seq_lens, k_cache.shape[2], cache=True)
    B, Hq, D = q.shape
    Hkv, T_max = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    G = Hq // Hkv
    _decode_kernel[(B, Hkv)](
        q, k_cache, v_cache, seq_lens, out, q.stride(0), q.stride(1), Hq, Hkv, T_max, D, G, float(scale),
        BLOCK_H=max(16, triton.next_power_of_2(G)), BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Triton causal prefill attention with the contract of hybrid_engine.ops.prefill_attention."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]:
        raise ValueError(f"prefill_attention: q must be [B, Hq, T, D] and k [B, Hkv, T, D], got {q.shape}, {k.shape}")
    _check("prefill_attention", q, k, v, seq_lens, q.shape[2])
    B, Hq, T, D = q.shape
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    BLOCK_M = 32
    _prefill_kernel[(triton.cdiv(T, BLOCK_M), B * Hq)](
        q, k, v, seq_lens, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], Hq, T, D, Hq // k.shape[1],
        float(scale), BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out
