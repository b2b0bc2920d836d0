"""train_sft (ZeRO-2) and train_reward (ZeRO-3) in 2 processes started by torchrun (gloo, CPU, one thread
each): the ranks train on different rows, report the same held-out figures, and what rank 0 saved
reloads in plain torch with those figures; with gradient accumulation, both equal the large batch. The worker is
rlhf_worker.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("rlhf_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(WORKER, tmp_path_factory.mktemp("rlhf2"))


def test_sft_under_zero2_shards_the_rows_and_saves_the_trained_model(ranks):
    a, b = ranks[0]["sft"], ranks[1]["sft"]
    assert a["stage"] == b["stage"] == 2
    assert len(a["losses"]) == len(b["losses"]) == 3 and a["losses"] != b["losses"]  # different rows
    assert a["evals"] == b["evals"]  # the whole eval split on every rank
    before, after = a["evals"][0][1], a["evals"][-1][1]
    assert after < before
    assert a["reloaded_ppl"] == pytest.approx(after, rel=1e-5)


def test_reward_under_zero3_shards_the_pairs_and_saves_the_trained_model(ranks):
    a, b = ranks[0]["rm"], ranks[1]["rm"]
    assert len(a["losses"]) == len(b["losses"]) == 3 and a["losses"] != b["losses"]
    assert a["evals"] == b["evals"]
    after = a["evals"][-1][1]
    assert after != a["evals"][0][1]  # it trained
    for key in ("accuracy", "chosen_mean", "rejected_mean", "loss"):
        assert a["reloaded"][key] == pytest.approx(after[key], rel=1e-5, abs=1e-6), key


def test_accumulation_under_zero2_and_zero3_equals_the_large_batch(ranks):
    """2 micro-batches of 2 rows per rank against 4 rows, SGD, fp32: within rel 1e-5 (test_accumulation.py's)."""
    for rank in ranks:
        big, small = rank["accumulation"]["1"], rank["accumulation"]["2"]
        for key in ("sft", "rm"):
            assert small[key] == pytest.approx(big[key], rel=1e-5) and big[key][0] != big[key][1], key
        assert small["sft_ppl"] == pytest.approx(big["sft_ppl"], rel=1e-5)
        assert small["rm_eval"] == pytest.approx(big["rm_eval"], rel=1e-5, abs=1e-6)
