"""The frozen reference and reward model partitioned under ZeRO-3 on 2 torchrun ranks (gloo, CPU): their scores equal
the whole models' to fp32 tolerance through the inference path and the HF forward, each rank holds half of each
model's parameters, and a PPO step under ZeRO-3 gives the same losses with them partitioned as whole. The worker is
frozen_worker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("frozen_worker.py")
FIGURES = ("policy_loss", "value_loss", "score", "kl", "rm_score")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("frozen")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun --nproc_per_node 2 frozen_worker.py failed:\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", ["reference-inference", "reference-hf", "reward-inference", "reward-hf"])
def test_partitioned_scores_equal_the_whole_models(ranks, name):
    """The same kernels on the same values: fp32 tolerance (in fact equal to the bit on this machine)."""
    for rank in ranks:
        assert rank["scores"][name] <= 1e-5, (name, rank["scores"])


@pytest.mark.parametrize("model", ["reference", "reward"])
def test_each_rank_holds_half_of_each_frozen_model(ranks, model):
    """ZeRO-3 pads each parameter to a multiple of the world size: half of the whole, within that padding."""
    for rank in ranks:
        partitioned, whole = rank["resident"][model]
        assert whole / 2 <= partitioned <= whole / 2 * 1.01, (model, partitioned, whole)


def test_a_ppo_step_with_partitioned_frozen_models_equals_one_with_whole_ones(ranks):
    for rank in ranks:
        part, whole = rank["ppo"]["partitioned"], rank["ppo"]["whole"]
        assert part["partitioned"] == [True, True] and whole["partitioned"] == [False, False]
        assert len(part["history"]) == len(whole["history"]) == 1
        for a, b in zip(part["history"], whole["history"]):
            assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in FIGURES if k in b), (a, b)
            assert all(k in a for k in FIGURES)
