"""The frozen reference and reward model partitioned under ZeRO-3 on 2 torchrun ranks (gloo, CPU): their scores equal
the whole models' to fp32 tolerance through the inference path and the HF forward, each rank holds half of each
model's parameters, and a PPO step under ZeRO-3 gives the same losses with them partitioned as whole. The worker is
frozen_worker.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("frozen_worker.py")
FIGURES = ("policy_loss", "value_loss", "score", "kl", "rm_score")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(WORKER, tmp_path_factory.mktemp("frozen"))


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


def test_a_partitioned_model_has_the_whole_models_fingerprint(ranks):
    """A checkpoint's record of the reference (weights_fingerprint) gathers each partition: the whole model's, on
    every rank, not the empty tensors ZeRO-3 leaves in place."""
    prints = [p for rank in ranks for p in rank["fingerprints"]["reference"]]
    assert len(set(prints)) == 1, prints


def test_a_ppo_step_with_partitioned_frozen_models_equals_one_with_whole_ones(ranks):
    for rank in ranks:
        part, whole = rank["ppo"]["partitioned"], rank["ppo"]["whole"]
        assert part["partitioned"] == [True, True] and whole["partitioned"] == [False, False]
        assert len(part["history"]) == len(whole["history"]) == 1
        for a, b in zip(part["history"], whole["history"]):
            assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in FIGURES if k in b), (a, b)
            assert all(k in a for k in FIGURES)
