"""A reward or eval function that does not return: call_with_timeout gives up after reward_timeout seconds, and PPO
skips that step's update (nonfinite "skip") or stops with RewardTimeout ("stop"), on one rank or on two."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from demo_models import demo_llama, demo_rows, tokenizer

from hybrid_engine.commands.main import build_parser
from hybrid_engine.rlhf.distributed import all_finite
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.ppo.rewards import RewardFunctions, call_functions
from hybrid_engine.rlhf.reward_fn import RewardTimeout, call_with_timeout

RELEASE = threading.Event()
"""Set at the end of the module: the functions left hanging return then."""


@pytest.fixture(scope="module", autouse=True)
def release_hung_calls():
    yield
    RELEASE.set()


def hang(**kwargs):
    RELEASE.wait()
    return [0.0]


def test_a_call_that_returns_in_time_gives_its_value_and_its_error():
    assert call_with_timeout(lambda x: x + 1, 5.0, {"x": 1}) == 2
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 5.0, {})
    with torch.no_grad():  # the function runs in the caller's grad mode
        assert call_with_timeout(torch.is_grad_enabled, 5.0, {}) is False


def test_a_call_that_hangs_is_given_up_after_the_timeout():
    t0 = time.perf_counter()
    with pytest.raises(RewardTimeout, match=r"hang did not return within 0.2 s \(reward_timeout\); it is left running"):
        call_with_timeout(hang, 0.2, {})
    assert time.perf_counter() - t0 < 5


def test_skip_turns_a_timed_out_batch_into_nan_scores():
    with pytest.warns(RuntimeWarning, match=r"its values are NaN for this batch"):
        scores = call_functions(RewardFunctions.load(hang), ["p", "q"], ["a", "b"], {}, timeout=0.2, nonfinite="skip")
    # NaN as numbers the function gave (not None, "does not apply"): the step's update is skipped
    assert scores.values.dtype == torch.float64 and scores.values.shape == (2, 1) and scores.values.isnan().all()
    assert scores.applies.all() and scores.combined.isnan().all()


def test_reward_timeout_is_a_flag_and_a_checked_setting():
    assert build_parser().parse_args(["ppo", "--reward-timeout", "5"]).reward_timeout == 5.0
    assert build_parser().parse_args(["ppo", "--reward-timeout", "none"]).reward_timeout is None
    assert PPOConfig().reward_timeout == 600.0
    with pytest.raises(ValueError, match=r"reward_timeout must be positive \(seconds\) or None, got 0"):
        PPOConfig(reward_timeout=0)


def hang_on_call(n: int):
    """A reward function that hangs on its n-th call (call 1 is the evaluation before training, k + 1 step k's)."""
    calls = []

    def fn(prompts, completions, **fields):
        calls.append(1)
        if len(calls) == n:
            RELEASE.wait()
        return [0.1 * len(c) for c in completions]

    return fn


def run(cache, nonfinite: str, reward_fn):
    config = PPOConfig(algo="grpo", max_steps=2, batch_size=2, train_batch_size=4, num_generations=2,
                       max_new_tokens=4, lr=1e-3, reward_timeout=0.5, nonfinite=nonfinite)
    sources = ModelSources(actor=demo_llama(), reward_fn=reward_fn)
    return train_ppo(sources, tokenizer(), demo_rows("ppo", 8, 4, cache), config, progress=False)


def test_ppo_skips_the_step_whose_reward_function_hangs(cache):
    with pytest.warns(RuntimeWarning, match=r"did not return within 0.5 s"):
        result = run(cache, "skip", hang_on_call(2))
    assert result.steps == 2 and result.skipped == 1 and [r["skipped"] for r in result.history] == [1, 0]
    assert math.isnan(result.history[0]["score"]) and math.isfinite(result.history[1]["policy_loss"])


def test_ppo_stops_when_asked(cache):
    with pytest.raises(RewardTimeout, match=r"did not return within 0.5 s"):
        run(cache, "stop", hang_on_call(2))


def _rank(rank: int, path: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    fn = hang if rank == 1 else (lambda prompts, completions: [1.0] * len(completions))
    values = call_functions(RewardFunctions.load(fn), ["p"], ["a"], {}, timeout=0.5, nonfinite="skip").combined
    out.put((rank, all_finite(values)))  # a collective: both ranks reach it, and agree to skip
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_timeout_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(out.get(timeout=5) for _ in range(2)) == [(0, False), (1, False)]
