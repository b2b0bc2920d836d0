"""Tensor-parallel generation: a group of k ranks that each keep 1/k of every block and generate one
batch together, with an all-reduce after the attention output and after the MLP (Megatron's split:
q|k|v and gate|up column-parallel by heads, o and down row-parallel)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hybrid_engine import ops
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.model.weights import Layer, Linear
from hybrid_engine.ops.decode_step import GATED


@dataclasses.dataclass
class TPGroup:
    """This rank's tensor-parallel group: `size` consecutive ranks, this one at `rank` within it."""

    size: int
    rank: int
    group: object  # a torch.distributed ProcessGroup
    ranks: list[int]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


def make_tp_group(size: int) -> TPGroup | None:
    """Splits the world into groups of `size` consecutive ranks (every rank must call this); None for size 1."""
    if size == 1:
        return None
    world, me = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if me in ranks:
            mine = TPGroup(size, ranks.index(me), group, ranks)
    return mine


def local_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The shape one TP rank computes: 1/tp of the heads and of the MLP."""
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp,
                               intermediate_size=spec.intermediate_size // tp)


def _column(lin: Linear, tp: int, r: int) -> Linear:
    bias = None if lin.bias is None else ops.shard_column_parallel(lin.bias, tp, r)
    return Linear(ops.shard_column_parallel(lin.weight, tp, r), bias)


def _row(lin: Linear, tp: int, r: int) -> Linear:
    # The bias of a row-parallel layer is added once, after the all-reduce: rank 0 keeps it.
    return Linear(ops.shard_row_parallel(lin.weight, tp, r), lin.bias if r == 0 else None)


def _qkv(lin: Linear, spec: ModelSpec, tp: int, r: int) -> Linear:
    heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    bias = None if lin.bias is None else ops.shard_qkv(lin.bias, *heads, tp, r)
    return Linear(ops.shard_qkv(lin.weight, *heads, tp, r), bias)


def _gated_up(lin: Linear, tp: int, r: int) -> Linear:
    """gate|up [2 I, H]: each half split alike, so the shard is gate_r|up_r and chunk(2) still pairs them."""
    halves = lin.weight.chunk(2, 0)
    weight = torch.cat([ops.shard_column_parallel(h.contiguous(), tp, r) for h in halves])
    bias = None
    if lin.bias is not None:
        bias = torch.cat([ops.shard_column_parallel(b.contiguous(), tp, r) for b in lin.bias.chunk(2)])
    return Linear(weight, bias)


def shard_layer(layer: Layer, spec: ModelSpec, tp: int, r: int) -> Layer:
    """Rank r's part of one block, every weight a new tensor made by the reshard ops."""
    up = _gated_up(layer.up, tp, r) if spec.activation in GATED else _column(layer.up, tp, r)
    # Qwen3's and Gemma 3's q/k norms act on each head over head_dim alone: every rank keeps the whole [D] weight;
    # Gemma 3's output norms act after the all-reduce, on whole rows.
    return Layer(attn_norm=layer.attn_norm, qkv=_qkv(layer.qkv, spec, tp, r), o=_row(layer.o, tp, r),
                 mlp_norm=layer.mlp_norm, up=up, down=_row(layer.down, tp, r), q_norm=layer.q_norm,
                 k_norm=layer.k_norm, attn_out_norm=layer.attn_out_norm, mlp_out_norm=layer.mlp_out_norm)


def gather_prompts(tp: TPGroup, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Every rank's prompts of the group, left-padded to one length, in rank order, and this rank's rows."""
    sizes = [torch.zeros(2, dtype=torch.long) for _ in range(tp.size)]
    dist.all_gather(sizes, torch.tensor(list(input_ids.shape)), group=tp.group)
    T = max(int(s[1]) for s in sizes)
    ids = F.pad(input_ids.long(), (T - input_ids.shape[1], 0))
    mask = F.pad(attention_mask.long(), (T - input_ids.shape[1], 0))
    all_ids = [torch.zeros(int(s[0]), T, dtype=torch.long) for s in sizes]
    all_mask = [torch.zeros(int(s[0]), T, dtype=torch.long) for s in sizes]
    dist.all_gather(all_ids, ids, group=tp.group)
    dist.all_gather(all_mask, mask, group=tp.group)
    first = sum(int(s[0]) for s in sizes[: tp.rank])
    return torch.cat(all_ids), torch.cat(all_mask), slice(first, first + input_ids.shape[0]), T - input_ids.shape[1]
