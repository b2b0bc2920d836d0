"""Shared test setup: fixed seeds, fixed dispatch routes, Triton's interpreter on machines without a GPU, `gpu`
skips, and the `cache` fixture (a datasets cache folder per test module)."""

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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A datasets cache folder for the test module (the cache_dir of demo_rows, load_step_data and the commands'
    --cache-dir), fresh for each module so that no module reads another's cached rows."""
    return str(tmp_path_factory.mktemp("datasets-cache"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
