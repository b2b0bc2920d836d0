"""rotary_append_kv as a Triton kernel: each program takes one token, all its heads at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_engine.triton._rounding import to_storage


@triton.jit
def _rotary_append_kv_kernel(
    q, k, v, k_cache, v_cache, positions, cos, sin,
    S, Hq, Hkv, D, T_max, half, rot,
    q_b, q_s, q_h, k_b, k_s, k_h, v_b, v_s, v_h,
    HAS_ROPE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    b = t // S
    s = t % S
    p = tl.load(positions + t).to(tl.int64)
    if p < 0:  # left padding: neither rotated nor cached
        return
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    q_row = q + b * q_b + s * q_s
    k_row = k + b * k_b + s * k_s
    v_row = v + b * v_b + s * v_s
    slot = ((b * Hkv + hk) * T_max + p) * D  # [BLOCK_HKV, 1]
    if HAS_ROPE:
        i = tl.arange(0, BLOCK_HALF)[None, :]
        im = i < half
        c = tl.load(cos + p * half + i, mask=im, other=0.0)
        sn = tl.load(sin + p * half + i, mask=im, other=0.0)
        qm = (hq < Hq) & im
        q1 = tl.load(q_row + hq * q_h + i, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_row + hq * q_h + half + i, mask=qm, other=0.0).to(tl.float32)
        tl.store(q_row + hq * q_h + i, to_storage(q1 * c - q2 * sn, q.dtype.element_ty), mask=qm)
        tl.store(q_row + hq * q_h + half + i, to_storage(q2 * c + q1 * sn, q.dtype.element_ty), mask=qm)
        km = (hk < Hkv) & im
        k1 = tl.load(k_row + hk * k_h + i, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + hk * k_h + half + i, mask=km, other=0.0).to(tl.float32)
        r1 = to_storage(k1 * c - k2 * sn, k.dtype.element_ty)
        r2 = to_storage(k2 * c + k1 * sn, k.dtype.element_ty)
        tl.store(k_row + hk * k_h + i, r1, mask=km)
        tl.store(k_row + hk * k_h + half + i, r2, mask=km)
        # The rotated values go to the cache from registers: re-reading k here would race with the stores above.
        # A bf16/fp16 cache under fp32 k rounds them once more; in k's own dtype to_storage changes nothing.
        tl.store(k_cache + slot + i, to_storage(r1.to(tl.float32), k_cache.dtype.element_ty), mask=km)
        tl.store(k_cache + slot + half + i, to_storage(r2.to(tl.float32), k_cache.dtype.element_ty), mask=km)
    # The k dims past the rotary ones (all of them without rope) and all of v are plain copies (rounded to a
    # narrower cache).
    hm = hk < Hkv
    kt_mask = hm & (d >= rot) & (d < D)
    kt = tl.load(k_row + hk * k_h + d, mask=kt_mask).to(tl.float32)
    tl.store(k_cache + slot + d, to_storage(kt, k_cache.dtype.element_ty), mask=kt_mask)
    v_mask = hm & (d < D)
    vt = tl.load(v_row + hk * v_h + d, mask=v_mask).to(tl.float32)
    tl.store(v_cache + slot + d, to_storage(vt, v_cache.dtype.element_ty), mask=v_mask)


def rotary_append_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Triton rotary_append_kv with the contract of hybrid_engine.ops.rotary_append_kv."""
    B, S, Hq, D = q.shape
    Hkv, T_max = k.shape[2], k_cache.shape[2]
    if k.shape != (B, S, Hkv, D) or v.shape != k.shape or positions.shape != (B, S):
        raise ValueError(f"rotary_append_kv: k, v must be [B, S, Hkv, D] and positions [B, S] for q {tuple(q.shape)}")
    if k_cache.shape != (B, Hkv, T_max, D) or v_cache.shape != k_cache.shape:
        raise ValueError("rotary_append_kv: k_cache and v_cache must be [B, Hkv, T_max, D]")
    if v_cache.dtype != k_cache.dtype or not (k_cache.dtype == q.dtype or (
            q.dtype == torch.float32 and k_cache.dtype in (torch.bfloat16, torch.float16))):
        raise ValueError(f"rotary_append_kv: the caches must have q's dtype, or bf16/fp16 under fp32 q; got "
                         f"{k_cache.dtype}, {v_cache.dtype} for q {q.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rotary_append_kv: k_cache and v_cache must be contiguous")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("rotary_append_kv: q, k and v must be contiguous in their last dimension")
    if (cos is None) != (sin is None):
        raise ValueError("rotary_append_kv: cos and sin must be given together")
    positions = positions.contiguous()
    if positions.numel() == 0:
        return
    p_max = int(positions.max())
    if p_max >= T_max or (cos is not None and p_max >= cos.shape[0]):
        raise ValueError(f"rotary_append_kv: position {p_max} is past the cache (T_max {T_max}) or the rotary tables")
    half = cos.shape[1] if cos is not None else 0
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    _rotary_append_kv_kernel[(B * S,)](
        q, k, v, k_cache, v_cache, positions, cos, sin,
        S, Hq, Hkv, D, T_max, max(half, 1), 2 * half,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        HAS_ROPE=cos is not None,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)), BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
