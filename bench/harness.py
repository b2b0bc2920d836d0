"""Benchmark harness: one roofline measured in the same run, machine metadata, the figures
every benchmark records in `extra_info` (ratio to the eager torch reference, achieved rates and
the fraction of the roofline), and which parametrized cases a run without --sweeps takes (representative)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from hybrid_engine._build import cpu_flags, cpu_id, cpu_model


def representative(values, *keep) -> list:
    """One parametrize axis's values, those not in `keep` marked `sweep`: a bare `pytest bench/ --benchmark-only`
    runs the product of every axis's kept values, --sweeps every value (bench/conftest.py). A tuple is one case of
    several argnames ("algo,provider")."""
    def mark(v):
        return pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.sweep)

    return [v if v in keep else mark(v) for v in values]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], warmup: int = 2, repeats: int = 7, min_time: float = 0.2,
                reduce: Callable[[list[float]], float] = statistics.median, max_time: float = math.inf) -> float:
    """Median (or `reduce`) seconds of one call of fn, over at least `repeats` calls and `min_time` seconds, unless
    the calls already took `max_time` seconds (at least one call is always timed)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200 or time.perf_counter() - start >= max_time:
            break
    return reduce(times)


@dataclass
class Roofline:
    """Read bandwidth (bytes/s of sum() over a 256 MiB fp32 tensor) and compute rate (FLOP/s of a
    1024^3 fp32 matmul; bf16_flops_per_s: the same in bf16), measured once per run on this machine, each the best of
    several calls."""

    read_bytes_per_s: float
    flops_per_s: float
    bf16_flops_per_s: float = 0.0

    def time(self, bytes_moved: float, flops: float = 0.0) -> float:
        """The roofline time of a piece of work: the larger of its memory time and compute time."""
        return max(bytes_moved / self.read_bytes_per_s, flops / self.flops_per_s)


def _probe_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The roofline probes' operands: 256 MiB of fp32 to sum, and two 1024 x 1024 fp32 matrices."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = torch.ones(64 * 1024 * 1024, dtype=torch.float32, device=device)
    return big, torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)


def _read_rate(big: torch.Tensor, **timing) -> float:
    """Bytes/s of big.sum(), its best call (median_time's `timing` arguments)."""
    return big.numel() * big.element_size() / median_time(lambda: big.sum(), reduce=min, **timing)


def _matmul_rate(a: torch.Tensor, b: torch.Tensor, **timing) -> float:
    """FLOP/s of a @ b, its best call (median_time's `timing` arguments)."""
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / median_time(lambda: a @ b, reduce=min, **timing)


def measure_roofline() -> Roofline:
    big, a, b = _probe_tensors()
    # The best call of each, not the median: the roofline is what the machine can do, and a slow spell of a shared
    # VM must not lower it (one run's median put the matmul at 68 GFLOP/s against 168-185 in the others of that hour).
    # On a CPU without bf16 units a bf16 1024^3 matmul takes seconds: that probe stops after 2 s (it took a minute).
    return Roofline(read_bytes_per_s=_read_rate(big, repeats=7),
                    flops_per_s=_matmul_rate(a, b, repeats=20, min_time=0.5),
                    bf16_flops_per_s=_matmul_rate(a.bfloat16(), b.bfloat16(), warmup=1, repeats=20, min_time=0.5,
                                                  max_time=2.0))


def machine_info(roofline: Roofline) -> dict:
    """The machine every result names: the CPU and its units, threads, torch, and the run's roofline."""
    info = {
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        # The units that change which implementation wins (ops/dispatch.py): AMX tiles, bf16 dot products.
        "cpu_units": [f for f in ("amx_bf16", "avx512_bf16", "avx512_vnni") if f in cpu_flags()],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "read_GBps": round(roofline.read_bytes_per_s / 1e9, 2),
        "matmul_GFLOPps": round(roofline.flops_per_s / 1e9, 1),
        "matmul_bf16_GFLOPps": round(roofline.bf16_flops_per_s / 1e9, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from hybrid_engine.ops import dispatch

    # decode_linear's measured hand-over rows to torch's GEMM in this run, so a figure traces to a choice.
    info["decode_linear_routes"] = dispatch.calibrate()["routes"]
    return info


def paired_roofline_fraction(fn: Callable[[], object], bytes_moved: float, flops: float = 0.0, rounds: int = 9
                             ) -> tuple[float, Roofline]:
    """fn's fraction of a roofline measured beside it: `rounds` alternations of a short probe (the best of 3 sum()
    over 256 MiB and of 3 fp32 1024^3 matmuls) with fn (the median of 3 calls), each round's fraction its probe's
    roofline time over its fn time; the median of the rounds' fractions, and the median probe. A shared VM's
    bandwidth drifts by a third within the hour, so a roofline measured once at the start of a run can be far from
    the one a case actually ran beside."""
    big, a, b = _probe_tensors()
    short = dict(warmup=1, repeats=3, min_time=0.0)
    fractions, probes = [], []
    for _ in range(rounds):
        probe = Roofline(read_bytes_per_s=_read_rate(big, **short),
                         flops_per_s=_matmul_rate(a, b, **short) if flops else math.inf)
        t = median_time(fn, **short)
        fractions.append(probe.time(bytes_moved, flops) / t)
        probes.append(probe)
    mid = sorted(range(rounds), key=lambda i: probes[i].read_bytes_per_s)[rounds // 2]
    return statistics.median(fractions), probes[mid]

_baselines: dict[str, float] = {}


def baseline_time(key: str, fn: Callable[[], object]) -> float:
    """Median time of the eager reference for `key`, measured once per run and shared by providers."""
    if key not in _baselines:
        _baselines[key] = median_time(fn)
    return _baselines[key]


def record(
    benchmark,
    *,
    provider: str,
    baseline_s: float | None = None,
    machine: dict,
    roofline: Roofline,
    bytes_moved: float = 0.0,
    flops: float = 0.0,
    **extra,
) -> None:
    """Put the run's figures into benchmark.extra_info (call after benchmark(...))."""
    t = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(machine)
    info["provider"] = provider
    if baseline_s is not None:
        info["speedup_vs_eager"] = round(baseline_s / t, 3)
    if bytes_moved:
        info["GBps"] = round(bytes_moved / t / 1e9, 2)
    if flops:
        info["GFLOPps"] = round(flops / t / 1e9, 2)
    if bytes_moved or flops:
        info["roofline_fraction"] = round(roofline.time(bytes_moved, flops) / t, 3)
    info.update(extra)


def run_benchmark(benchmark, fn: Callable[[], object], rounds: int = 5) -> object:
    """pytest-benchmark's pedantic mode with warm-up and GPU synchronisation inside the timed call."""

    def timed():
        out = fn()
        synchronize()
        return out

    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
