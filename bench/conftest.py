"""Benchmark fixtures: the run's roofline and the machine's description (bench/harness.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: Triton providers run in its interpreter on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import Roofline, cpu_model, measure_roofline  # noqa: E402

from hybrid_engine._build import cpu_flags, cpu_id  # noqa: E402


@pytest.fixture(scope="session")
def roofline() -> Roofline:
    return measure_roofline()


@pytest.fixture(scope="session")
def machine(roofline: Roofline) -> dict:
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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios to a baseline provider of the same group, from this run's own rows: a benchmark that
    sets extra_info["baseline_provider"] = P gets extra_info["speedup_vs_P"]."""
    rows = output_json["benchmarks"]
    by_group = {(b["group"], b["extra_info"].get("provider")): b for b in rows}
    for b in rows:
        base = b["extra_info"].get("baseline_provider")
        ref = by_group.get((b["group"], base))
        if base and ref:
            b["extra_info"][f"speedup_vs_{base}"] = round(ref["stats"]["median"] / b["stats"]["median"], 3)
