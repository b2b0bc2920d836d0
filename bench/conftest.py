"""Benchmark fixtures: the run's roofline and the machine's description (bench/harness.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: Triton providers run in its interpreter on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import Roofline, cpu_model, measure_roofline  # noqa: E402


@pytest.fixture(scope="session")
def roofline() -> Roofline:
    return measure_roofline()


@pytest.fixture(scope="session")
def machine(roofline: Roofline) -> dict:
    info = {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "read_GBps": round(roofline.read_bytes_per_s / 1e9, 2),
        "matmul_GFLOPps": round(roofline.flops_per_s / 1e9, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
