"""The three commands under torchrun with 2 processes (gloo, CPU): sft under ZeRO-2, reward and ppo under
ZeRO-3, each feeding the next, with no change to the code; sft under accelerate launch with an accelerate config's
ZeRO-2 trains as under torchrun with the same --ds-config; and a rank that dies mid-run ends the run with an error
that names it, not a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from accelerate_launch import write_config
from demo_models import demo_llama, save_demo_llama

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ZERO = {
    2: {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000, "allgather_bucket_size": 1000000}},
    3: {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000000,
                              "stage3_prefetch_bucket_size": 100000, "stage3_max_live_parameters": 1000000,
                              "stage3_max_reuse_distance": 1000000}},
}
KILLER = '''import os, signal
calls = 0
def score(prompts, completions, **fields):
    global calls
    calls += 1
    if calls == 2 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(len(c)) for c in completions]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd, timeout: int = 300, launcher: list[str] | None = None
             ) -> subprocess.CompletedProcess:
    """`hybrid-engine ARGS` on 2 processes: under torchrun, or under `launcher` (its flags, 2 processes)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    launcher = launcher or ["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                            "--master_port", str(_free_port())]
    cmd = [sys.executable, "-m", *launcher, "-m", "hybrid_engine.commands", *args, "--no-progress", "--cache-dir",
           str(cwd / "cache")]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli2")
    save_demo_llama(root / "start")
    for stage, config in ZERO.items():
        (root / f"z{stage}.json").write_text(json.dumps(config))
    return root


def _ok(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


SMALL = ["--max-steps", "2", "--batch-size", "2", "--demo"]


@pytest.fixture(scope="module")
def sft_zero2(work):
    """sft of the start model under torchrun and --ds-config z2.json: its summary."""
    _ok(torchrun(["sft", "--model", "start", "--output", "sft", "--ds-config", "z2.json", *SMALL], work), "sft")
    return json.loads((work / "sft" / "summary.json").read_text())


def test_the_three_commands_in_two_processes(work, sft_zero2):
    _ok(torchrun(["reward", "--model", "sft", "--output", "rm", "--ds-config", "z3.json", *SMALL], work), "reward")
    proc = torchrun(["ppo", "--model", "sft", "--reward-model", "rm", "--output", "ppo", "--ds-config", "z3.json",
                     "--train-batch-size", "2", "--max-new-tokens", "8", *SMALL], work)
    _ok(proc, "ppo")
    assert proc.stdout.count("ppo summary") == 1  # rank 0 alone reports
    summary = json.loads((work / "ppo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["logprob_source"] == "generation"
    assert all(r["policy_loss"] == r["policy_loss"] for r in summary["history"])  # finite, not NaN
    for folder in ("sft", "ppo", "ppo/critic", "rm"):
        assert (work / folder / "config.json").is_file(), folder
    assert sft_zero2["steps"] == 2


def test_accelerate_launch_trains_under_the_deepspeed_settings_of_its_config(work, sft_zero2):
    config = write_config(work / "accelerate_zero2.yaml")  # distributed_type DEEPSPEED, zero_stage 2, 2 processes
    launcher = ["accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(_free_port())]
    proc = torchrun(["sft", "--model", "start", "--output", "sft-accelerate", *SMALL], work, launcher=launcher)
    _ok(proc, "sft under accelerate launch")
    line = "DeepSpeed settings from accelerate launch: ZeRO-2, gradient accumulation 1, no offload, mixed precision no"
    assert proc.stdout.count(line) == 1  # rank 0 says it once
    losses = json.loads((work / "sft-accelerate" / "summary.json").read_text())["losses"]
    # as torchrun's run with --ds-config z2.json: two ranks' batches in one update (each rank training alone, as
    # without DeepSpeed, reaches another second loss: 5.4673 against 5.5127)
    assert losses == pytest.approx(sft_zero2["losses"], rel=1e-6, abs=0)


def test_a_dead_rank_ends_the_run_with_a_clear_error(work):
    (work / "killer.py").write_text(KILLER)
    start = work / "start"
    from hybrid_engine.rlhf import RewardModel

    RewardModel.from_model(demo_llama(seed=2)).save_pretrained(work / "rm0")
    proc = torchrun(["ppo", "--model", str(start), "--reward-model", "rm0", "--output", "dead", "--ds-config",
                     "z2.json", "--max-steps", "6", "--batch-size", "2", "--train-batch-size", "2",
                     "--max-new-tokens", "8", "--reward-fn", "killer.py:score", "--demo"], work, timeout=240)
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr and "Signal 9 (SIGKILL)" in proc.stderr  # torchrun names the dead rank
    assert not (work / "dead" / "summary.json").exists()
