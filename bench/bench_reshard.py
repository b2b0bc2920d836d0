"""reshard against its eager torch reference (chunk / narrow / cat / contiguous) and torch.compile of it.

Shapes: a 2048 x 2048 weight split column- and row-parallel at tp 4, a fused QKV of hidden 2048
(Hq 16, Hkv 4, D 128) at tp 4, and zero_to_tp of the 2048 x 2048 weight from 4 ZeRO-3 partitions.
The work is a copy: the shard is read once and written once, so bytes moved = 2 x shard bytes.
torch's eager copy already runs at that limit, so the shards land near 1x; zero_to_tp is where eager
torch copies twice (the whole weight first). The 4-16 MiB working sets stay in cache, so the fraction
of the (DRAM) read-bandwidth roofline can exceed 1.
"""

import pytest
import torch
from harness import baseline_time, record, representative, run_benchmark

from hybrid_engine.ops import (
    shard_column_parallel,
    shard_qkv,
    shard_reference,
    shard_row_parallel,
    zero_partition,
    zero_to_tp,
    zero_to_tp_reference,
)

HIDDEN, TP, RANK, WORLD = 2048, 4, 1, 4
QKV = dict(num_q_heads=16, num_kv_heads=4, head_dim=128)


def _case(name: str, dtype: torch.dtype):
    """(ours, eager reference, shard bytes) for one benchmark case."""
    w = torch.randn(HIDDEN, HIDDEN).to(dtype)
    if name == "column":
        return lambda: shard_column_parallel(w, TP, RANK), lambda: shard_reference(w, "column", TP, RANK)
    if name == "row":
        return lambda: shard_row_parallel(w, TP, RANK), lambda: shard_reference(w, "row", TP, RANK)
    if name == "qkv":
        qkv = torch.randn((16 + 2 * 4) * 128, HIDDEN).to(dtype)
        return (
            lambda: shard_qkv(qkv, 16, 4, 128, TP, RANK),
            lambda: shard_reference(qkv, "qkv", TP, RANK, **QKV),
        )
    parts = zero_partition(w, WORLD)
    return (
        lambda: zero_to_tp(parts, w.shape, "row", TP, RANK),
        lambda: zero_to_tp_reference(parts, w.shape, "row", TP, RANK),
    )


@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile"], "ours", "eager"))
@pytest.mark.parametrize("dtype", representative([torch.float32, torch.bfloat16], torch.float32))
@pytest.mark.parametrize("case", representative(["column", "row", "qkv", "zero_to_tp_row"], "zero_to_tp_row"))
def test_reshard(benchmark, case, dtype, provider, machine, roofline):
    ours, eager = _case(case, dtype)
    fn = {"ours": ours, "eager": eager, "compile": lambda f=torch.compile(eager): f()}[provider]
    benchmark.group = f"reshard {case} {str(dtype).removeprefix('torch.')} tp={TP}"
    shard_bytes = ours().nbytes
    run_benchmark(benchmark, fn, rounds=30)
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(benchmark.group, eager),
        machine=machine,
        roofline=roofline,
        bytes_moved=2 * shard_bytes,
    )
