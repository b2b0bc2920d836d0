"""token_logprobs as Triton kernels: the logits exist only one [BLOCK_N, BLOCK_V] tile at a time.

Forward: each program owns a block of rows and walks the vocabulary in tiles (each tile a K-loop of
tl.dot), keeping an online max / sum-exp / sum-exp-times-logit per row and picking the target logit.
Backward: each program owns one (row block, vocabulary block) tile, recomputes its logits, turns them
into the gradient of the scaled logits and adds its share of grad_hidden and grad_weight atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
_IGNORE: tl.constexpr = tl.constexpr(IGNORE_INDEX)  # jit code reads only constexpr globals


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # UPCAST (CPU tensors, i.e. TRITON_INTERPRET=1): the interpreter multiplies the raw bits of bf16
    # blocks, so they go through fp32 there; on a GPU bf16 stays on the tensor cores.
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    # ieee keeps fp32 inputs out of tf32, whose 10-bit mantissa would miss the fp32 tolerances.
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logits_tile(
    hidden,
    weight,
    rows,
    cols,
    row_live,
    col_live,
    H,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Raw logits hidden[rows] @ weight[cols].T, fp32 [BLOCK_N, BLOCK_V].
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_live = ks < H
        a = tl.load(hidden + rows[:, None] * H + ks[None, :], mask=row_live[:, None] & k_live[None, :], other=0.0)
        b = tl.load(weight + cols[:, None] * H + ks[None, :], mask=col_live[:, None] & k_live[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, UPCAST)
    return acc


@triton.jit
def _forward_kernel(
    hidden,
    weight,
    tokens,
    logprobs,
    entropy,
    lse,
    N,
    V,
    H,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = rows < N
    tok = tl.load(tokens + rows, mask=row_live, other=_IGNORE)
    # A finite start keeps (m_old - m_new) * s = 0 on the first tile instead of -inf * 0.
    m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of e^(z - m) (z - m)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_live = cols < V
        z = _logits_tile(hidden, weight, rows, cols, row_live, col_live, H, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST) * inv_t
        z = tl.where(col_live[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        u = tl.where(col_live[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_live[None, :], tl.exp(u), 0.0)
        d = m - m_new
        alpha = tl.exp(d)
        # Re-centre the running sums on the new max: e^(z-m_old) = alpha e^(z-m_new), (z-m_old) = (z-m_new) - d.
        t = alpha * (t + d * s) + tl.sum(e * u, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == tok[:, None], z, 0.0), 1)
    log_s = tl.log(s)
    row_lse = m + log_s
    tl.store(lse + rows, row_lse, mask=row_live)
    tl.store(entropy + rows, log_s - t / s, mask=row_live)
    tl.store(logprobs + rows, tl.where(tok == _IGNORE, 0.0, target - row_lse), mask=row_live)


@triton.jit
def _backward_kernel(
    hidden,
    weight,
    tokens,
    grad_logprobs,
    grad_entropy,
    lse,
    entropy,
    grad_hidden,
    grad_weight,
    N,
    V,
    H,
    inv_t,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_live, col_live = rows < N, cols < V
    tok = tl.load(tokens + rows, mask=row_live, other=_IGNORE)
    g_lp = tl.where(tok == _IGNORE, 0.0, tl.load(grad_logprobs + rows, mask=row_live, other=0.0))
    row_lse = tl.load(lse + rows, mask=row_live, other=0.0)
    z = _logits_tile(hidden, weight, rows, cols, row_live, col_live, H, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST) * inv_t
    p = tl.exp(z - row_lse[:, None])
    # d logprob / dz = onehot - p;  d entropy / dz = -p (z - (lse - entropy)).
    dz = -p * g_lp[:, None] + tl.where(cols[None, :] == tok[:, None], g_lp[:, None], 0.0)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy + rows, mask=row_live, other=0.0)
        c = row_lse - tl.load(entropy + rows, mask=row_live, other=0.0)
        dz -= p * g_ent[:, None] * (z - c[:, None])
    live = row_live[:, None] & col_live[None, :]
    dz = tl.where(live, dz * inv_t, 0.0).to(hidden.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_live = ks < H
        a = tl.load(hidden + rows[:, None] * H + ks[None, :], mask=row_live[:, None] & k_live[None, :], other=0.0)
        b = tl.load(weight + cols[:, None] * H + ks[None, :], mask=col_live[:, None] & k_live[None, :], other=0.0)
        gh = _dot(dz, b, None, UPCAST)  # [BLOCK_N, BLOCK_K]
        tl.atomic_add(grad_hidden + rows[:, None] * H + ks[None, :], gh, mask=row_live[:, None] & k_live[None, :])
        gw = _dot(tl.trans(dz), a, None, UPCAST)  # [BLOCK_V, BLOCK_K]
        tl.atomic_add(grad_weight + cols[:, None] * H + ks[None, :], gw, mask=col_live[:, None] & k_live[None, :])


def _check(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"token_logprobs: hidden must be [N, H] and weight [V, H], got {hidden.shape}, {weight.shape}")
    if weight.shape[0] < 1 or tokens.shape != (hidden.shape[0],) or tokens.dtype != torch.int64:
        raise ValueError(f"token_logprobs: tokens must be int64 [N] and V >= 1, got {tokens.dtype} {tokens.shape}")
    if hidden.dtype != weight.dtype or temperature <= 0:
        raise ValueError(f"token_logprobs: hidden and weight dtypes differ or temperature {temperature} <= 0")
    bad = (tokens != IGNORE_INDEX) & ((tokens < 0) | (tokens >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"token_logprobs: tokens out of range [0, {weight.shape[0]}): {tokens[bad][:5].tolist()}")


def _blocks(H: int) -> tuple[int, int, int]:
    # tl.dot needs every block dimension >= 16; BLOCK_K covers small H in one step.
    return 16, 64, min(64, max(16, triton.next_power_of_2(H)))


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy, lse), fp32 [N] each, with the contract of hybrid_engine::token_logprobs."""
    _check(hidden, weight, tokens, temperature)
    hidden, weight, tokens = hidden.contiguous(), weight.contiguous(), tokens.contiguous()
    (N, H), V = hidden.shape, weight.shape[0]
    logprobs, entropy, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    BLOCK_N, BLOCK_V, BLOCK_K = _blocks(H)
    _forward_kernel[(triton.cdiv(N, BLOCK_N),)](
        hidden,
        weight,
        tokens,
        logprobs,
        entropy,
        lse,
        N,
        V,
        H,
        1.0 / temperature,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
        UPCAST=hidden.device.type != "cuda",
    )
    return logprobs, entropy if with_entropy else torch.zeros_like(entropy), lse


def token_logprobs_backward(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) with the contract of hybrid_engine::token_logprobs_backward."""
    _check(hidden, weight, tokens, temperature)
    hidden, weight, tokens = hidden.contiguous(), weight.contiguous(), tokens.contiguous()
    (N, H), V = hidden.shape, weight.shape[0]
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    grad_logprobs = grad_logprobs.float().contiguous()
    # The tiles add into fp32 buffers; rounding to the inputs' dtype happens once, at the end.
    grad_hidden = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    BLOCK_N, BLOCK_V, BLOCK_K = _blocks(H)
    has_grad_entropy = grad_entropy is not None
    _backward_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))](
        hidden,
        weight,
        tokens,
        grad_logprobs,
        grad_entropy.float().contiguous() if has_grad_entropy else lse,
        lse.contiguous(),
        entropy.contiguous(),
        grad_hidden,
        grad_weight,
        N,
        V,
        H,
        1.0 / temperature,
        HAS_GRAD_ENTROPY=has_grad_entropy,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
        UPCAST=hidden.device.type != "cuda",
    )
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)
