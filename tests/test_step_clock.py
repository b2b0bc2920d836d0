"""hybrid_engine.benchmarks.step_clock, the wall clock around every provider's RLHF step, and bench/rlhf_worker.py's
step records: for every provider (ours, ours-reference, trl, trl-patched, trl-cb, hf, deepspeed) the phases sum to at
most the step's wall time, and the wall time is measured apart from them (some of it is left untimed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hybrid_engine.benchmarks.step_clock import PHASES, TrainerClock, clock_calls, trainer_steps, untimed_s

WORKER = Path(__file__).resolve().parents[1] / "bench" / "rlhf_worker.py"


def assert_wall_clock(step: dict) -> None:
    """Every phase timed, their sum at most the step's wall time, and more than 1 us of it untimed: a wall time
    computed as the phases' sum leaves nothing (float rounding of a few seconds is ~1e-15 s)."""
    assert all(step[p] > 0 for p in PHASES), step
    assert sum(step[p] for p in PHASES) <= step["time_s"], step
    assert untimed_s(step) > 1e-6, f"the wall time is the phases' sum: {step}"


def test_a_wall_time_made_of_the_phases_fails_the_check():
    phases = {"generate_s": 0.5, "experience_s": 0.25, "train_s": 1.125}
    assert_wall_clock(dict(phases, time_s=1.9))
    with pytest.raises(AssertionError, match="the phases' sum"):
        assert_wall_clock(dict(phases, time_s=sum(phases.values())))
    with pytest.raises(AssertionError):
        assert_wall_clock(dict(phases, time_s=1.8))  # phases beyond the wall: overlapping timers


def test_clock_calls_records_every_call_and_restores_the_function():
    module = types.SimpleNamespace(step=lambda x: 2 * x)
    original = module.step
    with clock_calls(module, "step") as spans:
        assert [module.step(i) for i in range(3)] == [0, 2, 4]
    assert module.step is original
    assert len(spans) == 3 and all(a <= b for a, b in spans) and spans[0][1] <= spans[1][0]


def test_clock_calls_restores_on_an_exception_and_times_the_raising_call():
    def fail():
        raise ValueError("boom")

    module = types.SimpleNamespace(step=fail)
    with pytest.raises(ValueError), clock_calls(module, "step") as spans:
        module.step()
    assert module.step is fail and len(spans) == 1


def _clock(begins, optimizer_ends, ends) -> TrainerClock:
    clock = TrainerClock()
    clock.begins, clock.optimizer_ends, clock.ends = list(begins), list(optimizer_ends), list(ends)
    return clock


def test_trainer_steps_split_each_step_by_its_own_spans():
    """Two steps [0, 10] and [10, 25]: generation inside the rollout-and-scoring span, training from that span's end
    to the optimizer step's; the time outside them stays untimed."""
    clock = _clock([0.0, 10.0], [9.0, 24.0], [10.0, 25.0])
    generate = [(1.0, 3.0), (11.0, 15.0)]
    experience = [(0.5, 4.0), (10.5, 17.0)]
    first, second = trainer_steps(clock, generate, experience)
    assert first == {"time_s": 10.0, "generate_s": 2.0, "experience_s": 1.5, "train_s": 5.0}
    assert second == {"time_s": 15.0, "generate_s": 4.0, "experience_s": 2.5, "train_s": 7.0}
    assert untimed_s(first) == pytest.approx(1.5) and untimed_s(second) == pytest.approx(1.5)


def test_trainer_steps_refuse_a_step_without_its_rollout():
    with pytest.raises(ValueError, match="without a rollout"):
        trainer_steps(_clock([0.0], [9.0], [10.0]), [], [(11.0, 12.0)])
    with pytest.raises(ValueError, match="unpaired"):
        trainer_steps(_clock([0.0], [], [10.0]), [], [(1.0, 2.0)])


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER_CASES = [
    pytest.param("ours", "ppo", [], id="ours-ppo"),
    pytest.param("ours-reference", "grpo", [], id="ours-reference-grpo"),
    pytest.param("trl", "grpo", [], id="trl-grpo"),
    pytest.param("trl-patched", "rloo", [], id="trl-patched-rloo"),
    pytest.param("trl-cb", "grpo", [], id="trl-cb-grpo"),
    pytest.param("hf", "ppo", [], id="hf-ppo"),
    pytest.param("deepspeed", "ppo", ["--zero3"], id="deepspeed-ppo-zero3", marks=pytest.mark.distributed),
]


@pytest.mark.slow
@pytest.mark.parametrize("provider,algo,extra", WORKER_CASES)
def test_worker_phases_sum_to_at_most_the_wall_time(tmp_path, provider, algo, extra):
    """A tiny run of bench/rlhf_worker.py (2 steps): every step's phases within its wall clock, which is measured
    on its own; deepspeed on 2 torchrun ranks under ZeRO-3."""
    if provider.startswith("trl"):
        pytest.importorskip("trl")
    out = tmp_path / "run.json"
    args = [str(WORKER), provider, algo, str(out), "--hidden", "64", "--layers", "2", "--steps", "2", "--prompts", "2",
            "--generations", "2", "--completion", "8", *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable]
    if extra:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", str(_port())]
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert len(result["steps"]) == 2
    for step in result["steps"]:
        assert_wall_clock(step)
    assert result["shape"]["prompt_tokens"] > 1 and result["shape"]["critic_params"] < result["shape"]["matmul_params"]
