import math

import pytest
import torch

from hybrid_engine.ops import (
    gather_column_parallel,
    gather_qkv,
    gather_row_parallel,
    kernels,
    reshard_gather,
    reshard_gather_reference,
    reshard_scatter,
    reshard_scatter_reference,
    shard_column_parallel,
    shard_qkv,
    shard_reference,
    shard_row_parallel,
    tp_to_zero,
    unshard_reference,
    use_backend,
    zero_partition,
    zero_to_tp,
    zero_unpartition,
)

DTYPES = [torch.float32, torch.bfloat16, torch.int64]
HEADS = [(8, 8), (8, 2), (8, 1), (16, 4)]  # (Hq, Hkv): GQA ratios 1, 4, 8 (kv replicated for tp > Hkv) and 4


def make(shape, dtype, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, device=device, dtype=torch.int64).to(dtype)


# (src shape, offset, row_stride, row_starts, row_counts, col_start, col_count): plain slices, several
# blocks out of order, repeated and empty blocks, an offset, whole rows (one contiguous piece) and 1-element rows.
PLANS = [
    ((7, 123), 0, 123, [2], [3], 5, 118),
    ((123, 7), 0, 7, [100, 3, 0], [23, 1, 0], 1, 6),
    ((5, 80), 3, 80, [0, 0], [4, 2], 0, 77),
    ((64, 128), 0, 128, [40, 0], [24, 16], 0, 128),
    ((1, 1), 0, 1, [0], [1], 0, 1),
    ((123,), 0, 1, [5, 60], [50, 7], 0, 1),
]


@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("plan", PLANS)
def test_gather_and_scatter_match_reference(plan, dtype, backend):
    shape, *args = plan
    src = make(shape, dtype) if dtype != torch.bool else torch.rand(shape) > 0.5
    with use_backend(backend):
        out = reshard_gather(src, *args)
    assert out.dtype == dtype and torch.equal(out, reshard_gather_reference(src, *args))
    if len(set(args[2])) == len(args[2]):  # disjoint blocks: the scatter is the gather's inverse
        dst, dst_ref = torch.zeros_like(src), torch.zeros_like(src)
        with use_backend(backend):
            reshard_scatter(dst, out, *args[:-1])
        reshard_scatter_reference(dst_ref, out, *args[:-1])
        assert torch.equal(dst, dst_ref)


@pytest.mark.parametrize("numel", [100_003, 1 << 20])
def test_large_copies_split_over_threads(numel):
    # Sizes over the parallel grain: the threads' chunks start and end inside rows and blocks.
    src = torch.randn(numel)
    offset, rows = numel % 997, numel // 997 - 1
    args = (offset, 997, [rows // 2, 0], [rows - rows // 2, rows // 2], 3, 990)
    assert torch.equal(reshard_gather(src, *args), reshard_gather_reference(src, *args))
    assert torch.equal(reshard_gather(src, 0, numel, [0], [1], 0, numel).view(-1), src)
    dst = torch.zeros(numel)
    reshard_scatter(dst, src.view(1, numel), 0, numel, [0], [1], 0)
    assert torch.equal(dst, src)


def _round_trips(full, layout, tp, world_size, **kw):
    shards = [shard_reference(full, layout, tp, r, **kw) for r in range(tp)]
    ours = {"column": shard_column_parallel, "row": shard_row_parallel}.get(layout)
    for r in range(tp):
        got = (
            ours(full, tp, r) if ours else shard_qkv(full, kw["num_q_heads"], kw["num_kv_heads"], kw["head_dim"], tp, r)
        )
        assert got.is_contiguous() and torch.equal(got, shards[r]), f"rank {r}"
    gather = {"column": gather_column_parallel, "row": gather_row_parallel}.get(layout)
    back = gather(shards) if gather else gather_qkv(shards, kw["num_q_heads"], kw["num_kv_heads"], kw["head_dim"])
    assert torch.equal(back, full) and torch.equal(unshard_reference(shards, layout, **kw), full)
    # full -> ZeRO partitions -> TP shards -> ZeRO partitions -> full.
    partitions = zero_partition(full, world_size)
    tp_shards = [zero_to_tp(partitions, full.shape, layout, tp, r, **kw) for r in range(tp)]
    for r in range(tp):
        assert torch.equal(tp_shards[r], shards[r]), f"rank {r}"
    again = tp_to_zero(tp_shards, full.shape, layout, world_size, **kw)
    assert torch.equal(again, partitions)
    assert torch.equal(zero_unpartition(again, full.shape), full)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(1, 7), (7, 123), (5, 1)])
def test_column_and_row_round_trips(n, k, tp, dtype):
    _round_trips(make((tp * n, k), dtype), "column", tp, world_size=3)
    _round_trips(make((tp * n,), dtype), "column", tp, world_size=4)  # a bias
    _round_trips(make((k, tp * n), dtype), "row", tp, world_size=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d,k", [(7, 123), (64, 7)])
def test_qkv_round_trips(d, k, hq, hkv, tp, dtype):
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    _round_trips(make(((hq + 2 * hkv) * d, k), dtype), "qkv", tp, world_size=3, **kw)
    _round_trips(make(((hq + 2 * hkv) * d,), dtype), "qkv", tp, world_size=2, **kw)  # a fused bias


def test_qkv_replicates_kv_heads():
    hq, hkv, d, tp = 8, 2, 3, 8
    heads = torch.arange(hq + 2 * hkv).repeat_interleave(d)[:, None].expand(-1, 5).contiguous()  # row = head id
    for r in range(tp):
        shard = shard_qkv(heads, hq, hkv, d, tp, r)[::d, 0].tolist()
        assert shard == [r, hq + r * hkv // tp, hq + hkv + r * hkv // tp]


@pytest.mark.parametrize("numel,world_size", [(1, 1), (7, 2), (123, 4), (3, 8), (4096, 4)])
def test_zero_partition_follows_deepspeed(numel, world_size):
    # DeepSpeed's _partition_param: P = aligned / world_size with aligned = numel + padding to a multiple of
    # world_size; rank r copies flat[r P, min((r + 1) P, numel)) into the front of its [P] partition.
    x = torch.randn(numel)
    padding = (world_size - numel % world_size) % world_size
    p = (numel + padding) // world_size
    parts = zero_partition(x.view(1, numel), world_size)
    assert parts.shape == (world_size, p)
    for r in range(world_size):
        start, end = r * p, min((r + 1) * p, numel)
        assert torch.equal(parts[r, : max(end - start, 0)], x[start:end])
        assert (parts[r, max(end - start, 0) :] == 0).all()
    assert torch.equal(zero_unpartition(parts, (1, numel)), x.view(1, numel))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_triton_round_trips(hq, hkv, dtype):
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=7)
    with use_backend("triton"):
        _round_trips(make(((hq + 2 * hkv) * 7, 9), dtype), "qkv", 4, world_size=3, **kw)
        _round_trips(make(((hq + 2 * hkv) * 7,), dtype), "qkv", 8, world_size=2, **kw)
        _round_trips(make((4 * 7, 123), dtype), "column", 4, world_size=3)
        _round_trips(make((7, 2 * 5), dtype), "row", 2, world_size=4)


def test_reference_backend_round_trip():
    full = make((24, 10), torch.float32)
    with use_backend("reference"):
        _round_trips(full, "row", 2, world_size=3)


def test_gather_gradient_accumulates_repeated_rows():
    src = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s: reshard_gather(s, 0, 5, [1, 0, 2], [2, 3, 1], 1, 3), (src,))


def test_opcheck():
    src = torch.randn(9, 12, requires_grad=True)
    torch.library.opcheck(kernels().reshard_gather.default, (src, 1, 12, [5, 0], [3, 2], 2, 7))
    dst = torch.zeros(9, 12)
    shard = torch.randn(5, 7)
    torch.library.opcheck(kernels().reshard_scatter.default, (dst, shard, 1, 12, [5, 0], [3, 2], 2))


def test_compiles_with_torch_compile():
    full = torch.randn((16 + 2 * 4) * 8, 24)
    parts = zero_partition(full, 3)

    def fn(full, parts):
        return shard_qkv(full, 16, 4, 8, 4, 1) + zero_to_tp(
            parts, full.shape, "qkv", 4, 1, num_q_heads=16, num_kv_heads=4, head_dim=8
        )

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(
        compiled(full, parts), 2 * shard_reference(full, "qkv", 4, 1, num_q_heads=16, num_kv_heads=4, head_dim=8)
    )


SRC = torch.randn(4, 6)
GATHER_ERRORS = [
    ((SRC, 0, 6, [0, 3], [1, 2], 0, 6), r"rows \[3, 3 \+ 2\) of block 1 \(row_starts\[1\], row_counts\[1\]\) run past"),
    ((SRC, 5, 6, [3], [1], 0, 6), r"run past the end of src"),
    ((SRC, -1, 6, [0], [1], 0, 6), "offset must be >= 0"),
    ((SRC, 0, 6, [0], [1], 4, 3), r"col_start \+ col_count \(4 \+ 3\) must be <= row_stride \(6\)"),
    ((SRC, 0, 6, [0, 1], [1], 0, 6), "row_starts and row_counts must have the same length"),
    ((SRC, 0, 6, [-1], [1], 0, 6), r"row_starts\[0\]"),
    ((SRC, 0, 6, [2**62], [2**62], 0, 6), "run past the end of src"),
    ((SRC, 2**62, 2**62, [1], [1], 0, 6), "run past the end of src"),
    ((SRC.t(), 0, 4, [0], [1], 0, 4), "src must be contiguous"),
]
SCATTER_ERRORS = [
    ((SRC.clone(), torch.randn(2, 6), 0, 6, [3], [2], 0), r"run past the end of dst"),
    ((SRC.clone(), torch.randn(2, 6, dtype=torch.float64), 0, 6, [0], [2], 0), "shard and dst must have the same"),
    ((SRC.clone(), torch.randn(3, 6), 0, 6, [0], [2], 0), r"shard.size\(0\) must be 2"),
    ((SRC.clone(), torch.randn(12), 0, 6, [0], [2], 0), "shard must be 2-D"),
    ((SRC.clone().t(), torch.randn(1, 4), 0, 4, [0], [1], 0), "dst must be contiguous"),
]


@pytest.mark.parametrize("backend", ["kernels", "triton", "reference"])
@pytest.mark.parametrize("args,match", GATHER_ERRORS)
def test_gather_bad_input_names_the_argument(args, match, backend):
    with use_backend(backend), pytest.raises(RuntimeError, match=match):
        reshard_gather(*args)


@pytest.mark.parametrize("backend", ["kernels", "triton", "reference"])
@pytest.mark.parametrize("args,match", SCATTER_ERRORS)
def test_scatter_bad_input_names_the_argument(args, match, backend):
    with use_backend(backend), pytest.raises(RuntimeError, match=match):
        reshard_scatter(*args)


QKV = torch.randn((8 + 2 * 2) * 4, 6)
API_ERRORS = [
    (lambda: shard_column_parallel(torch.randn(7, 4), 2, 0), r"weight.size\(0\) must be divisible by tp_size"),
    (lambda: shard_row_parallel(torch.randn(4, 7), 2, 0), r"weight.size\(1\) must be divisible by tp_size"),
    (lambda: shard_row_parallel(torch.randn(8), 2, 0), "weight must be 2-D"),
    (lambda: shard_column_parallel(torch.randn(8, 4), 2, 2), "tp_rank must be in"),
    (lambda: shard_qkv(QKV, 8, 2, 4, 2, -1), "tp_rank must be in"),
    (lambda: shard_qkv(QKV, 8, 2, 4, 16, 0), r"num_q_heads \(8\) must be divisible by tp_size"),
    (lambda: shard_qkv(torch.randn((6 + 6) * 4, 6), 6, 3, 4, 2, 0), r"num_kv_heads \(3\) must divide tp_size"),
    (lambda: shard_qkv(QKV, 8, 3, 4, 2, 0), "num_q_heads .* must be a positive multiple of num_kv_heads"),
    (lambda: shard_qkv(QKV, 8, 2, 5, 2, 0), r"weight.size\(0\) must be \(num_q_heads"),
    (lambda: zero_to_tp(torch.randn(3, 4), (4, 4), "row", 2, 0), "partitions must be"),
    (lambda: zero_to_tp(zero_partition(QKV, 2), QKV.shape, "diagonal", 2, 0), "layout must be"),
    (lambda: gather_row_parallel([torch.randn(4, 3), torch.randn(4, 2)]), r"shards\[1\] must be"),
    (lambda: zero_partition(QKV, 0), "world_size must be >= 1"),
]


@pytest.mark.parametrize("fn,match", API_ERRORS)
def test_api_bad_input_names_the_argument(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_cuda_matches_reference(backend, dtype):
    hq, hkv, d, tp = 16, 4, 128, 8
    full = make(((hq + 2 * hkv) * d, 2048 + 3), dtype, device="cuda")
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    with use_backend(backend):
        _round_trips(full, "qkv", tp, world_size=3, **kw)
        _round_trips(full, "row", 1, world_size=4)
        # Odd offsets and widths: the kernel falls back from 16-byte to narrower vectors.
        for plan in [(1, 2051, [3, 100], [50, 7], 1, 1001), (0, 2051, [0], [64], 3, 2048)]:
            src = full.view(-1)[: math.prod(full.shape)]
            assert torch.equal(reshard_gather(src, *plan), reshard_gather_reference(src, *plan))
