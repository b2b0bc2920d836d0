"""reshard_gather / reshard_scatter as Triton kernels: each program copies a [BLOCK_R, BLOCK_C] tile.

The copy is bitwise: tensors are reinterpreted as same-width integers, so any dtype is exact and one
compiled kernel per element width serves all of them. Each shard row's place in the flat tensor comes
from a small int64 table built on the host, which keeps the kernel free of the block search. The
plan is checked by the caller (hybrid_engine.ops.reshard) before these run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_rows_kernel(
    flat, shard, row_offsets, R, C, GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_live = rows < R
    live = row_live[:, None] & (cols < C)[None, :]
    flat_offs = tl.load(row_offsets + rows, mask=row_live, other=0)[:, None] + cols[None, :]
    shard_offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    if GATHER:
        tl.store(shard + shard_offs, tl.load(flat + flat_offs, mask=live), mask=live)
    else:
        tl.store(flat + flat_offs, tl.load(shard + shard_offs, mask=live), mask=live)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    if t.element_size() not in _BITS:
        raise RuntimeError(f"reshard (triton): unsupported element size {t.element_size()} of {t.dtype}")
    return t.view(_BITS[t.element_size()])


def _launch(
    flat: torch.Tensor,
    shard: torch.Tensor,
    offset: int,
    row_stride: int,
    row_starts: list[int],
    row_counts: list[int],
    col_start: int,
    gather: bool,
) -> None:
    R, C = shard.shape
    if R == 0 or C == 0:
        return
    # Flat offset of each shard row: offset + col_start + row_stride * (its row in the flat tensor).
    rows = torch.cat([torch.arange(s, s + c, dtype=torch.int64) for s, c in zip(row_starts, row_counts)])
    row_offsets = (rows * row_stride + (offset + col_start)).to(flat.device)
    BLOCK_C = min(triton.next_power_of_2(C), 1024)
    BLOCK_R = max(4096 // BLOCK_C, 1)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _copy_rows_kernel[grid](
        _as_bits(flat).view(-1), _as_bits(shard), row_offsets, R, C, GATHER=gather, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C
    )


def reshard_gather(
    src: torch.Tensor,
    offset: int,
    row_stride: int,
    row_starts: list[int],
    row_counts: list[int],
    col_start: int,
    col_count: int,
) -> torch.Tensor:
    """Triton reshard_gather with the contract of hybrid_engine.ops.reshard_gather."""
    out = src.new_empty(sum(row_counts), col_count)
    _launch(src, out, offset, row_stride, row_starts, row_counts, col_start, gather=True)
    return out


def reshard_scatter(
    dst: torch.Tensor,
    shard: torch.Tensor,
    offset: int,
    row_stride: int,
    row_starts: list[int],
    row_counts: list[int],
    col_start: int,
) -> None:
    """Triton reshard_scatter with the contract of hybrid_engine.ops.reshard_scatter."""
    _launch(dst, shard.contiguous(), offset, row_stride, row_starts, row_counts, col_start, gather=False)
