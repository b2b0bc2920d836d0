"""Shared test setup: fixed seeds, fixed dispatch routes, Triton's interpreter on machines without a GPU, `gpu`
skips."""

import os

import pytest
import torch

# decode_linear's measured routes (ops/dispatch.py) would make a run's numerics depend on timing noise: the
# suite runs on the fixed defaults, and tests/test_dispatch.py calibrates explicitly. Every route is held to the
# same tolerances there.
os.environ.setdefault("HYBRID_ENGINE_CALIBRATE", "0")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported: it decides then between compiling and interpreting.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
