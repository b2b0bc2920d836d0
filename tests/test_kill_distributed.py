"""`hybrid-engine ppo` on 2 ranks under torchrun and DeepSpeed ZeRO-2 and ZeRO-3 with --checkpoint-every 1, killed
with SIGKILL (torchrun and both ranks) twice and resumed with --resume: once in step 3, with step 2's checkpoint
written, and once while rank 0 renames step 4's checkpoint into place, every rank's files written. The losses, scores
and the final weights (ZeRO-3's gathered) equal an uninterrupted run's, to the bit, on both ranks. The worker is
kill_worker.py (the command line with the hooks that stop rank 0 where the kill is wanted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from demo_models import demo_llama, save_demo_llama
from torchrun import WORKER_ENV, torchrun_command

from hybrid_engine.rlhf import RewardModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("kill_worker.py")
BUCKETS = {"reduce_bucket_size": 1000000, "allgather_bucket_size": 1000000}
STEPS = 5


def _ppo_args(root: Path, out: Path, resume: bool) -> list[str]:
    """The run's flags; its ZeRO config is root's zero.json (the test's stage)."""
    args = ["ppo", "--model", str(root / "sft"), "--reward-model", str(root / "rm"), "--output", str(out),
            "--ds-config", str(root / "zero.json"), "--cache-dir", str(root / "cache"), "--no-progress",
            "--max-steps", str(STEPS), "--batch-size", "2", "--train-batch-size", "2", "--max-new-tokens", "6",
            "--lr", "1e-3", "--critic-lr", "1e-3", "--eval-every", "0", "--checkpoint-every", "1", "--demo"]
    return args + (["--resume"] if resume else [])


def _env(record: Path, hold: str = "", ready: Path | None = None) -> dict:
    record.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **WORKER_ENV, "KILL_RECORD": str(record), "KILL_HOLD": hold, "KILL_READY": str(ready)}


def _run(root: Path, out: Path, record: Path, resume: bool) -> list[dict]:
    """The run to its end; what each rank recorded."""
    proc = subprocess.Popen(torchrun_command(WORKER, _ppo_args(root, out, resume)), env=_env(record),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    if proc.returncode != 0:
        pytest.fail(f"ppo under torchrun failed:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def _kill_tree(proc: subprocess.Popen) -> int:
    """Kills torchrun and its ranks (each in its own session) with SIGKILL; how many were alive."""
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in ranks:
        p.send_signal(signal.SIGKILL)
    alive = proc.poll() is None
    proc.kill()  # Popen reaps torchrun itself (psutil's wait would take its exit status)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    return len(ranks) + alive


def _run_and_kill(root: Path, out: Path, hold: str, resume: bool) -> None:
    """The run until rank 0 stops at `hold`; then torchrun and every rank are killed with SIGKILL."""
    ready, log = root / f"ready-{hold.replace(':', '-')}", root / f"log-{hold.replace(':', '-')}"
    with open(log, "w") as stream:
        proc = subprocess.Popen(torchrun_command(WORKER, _ppo_args(root, out, resume)), stdout=stream,
                                stderr=subprocess.STDOUT, env=_env(root / "none", hold, ready))
        try:
            _wait_for(ready, proc, log)
            assert _kill_tree(proc) == 3  # torchrun and its two ranks
        finally:
            _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL


def _wait_for(ready: Path, proc: subprocess.Popen, log: Path) -> None:
    """Until rank 0 says it stopped where it was told to."""
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it reached {log.name}:\n{log.read_text()[-6000:]}")
        assert time.monotonic() < deadline, f"the run did not reach {log.name} within 300 s"
        time.sleep(0.05)


def _files(out: Path) -> dict[str, bytes]:
    """The saved actor's and critic's weights files."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))
            if "checkpoints" not in p.parts}


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def root(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"kill-zero{request.param}")
    save_demo_llama(folder / "sft")
    torch.manual_seed(3)
    RewardModel.from_model(demo_llama(seed=2)).save_pretrained(folder / "rm")
    (folder / "zero.json").write_text(json.dumps({"zero_optimization": {"stage": request.param, **BUCKETS}}))
    return folder


def test_sigkill_in_a_step_and_in_a_checkpoint_write_resumes_to_the_bit(root):
    whole = _run(root, root / "whole", root / "whole-record", resume=False)
    out = root / "killed"
    _run_and_kill(root, out, "step:3", resume=False)
    found = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert found == ["step-1", "step-2"], found  # killed in step 3: step 2's checkpoint is the newest
    assert not (out / "summary.json").exists()

    _run_and_kill(root, out, "rename:4", resume=True)  # from step 2: step 3 again, then step 4's checkpoint
    tmp = out / "checkpoints" / ".step-4.tmp"
    assert {"optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "manifest.json"} <= set(os.listdir(tmp))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-4.tmp", "step-2", "step-3"]

    resumed = _run(root, out, root / "resumed-record", resume=True)  # from step 3
    for rank in range(2):
        assert len(whole[rank]["history"]) == STEPS
        assert resumed[rank]["history"] == whole[rank]["history"], rank  # losses, scores, KL: every figure
        assert resumed[rank]["actor"] == whole[rank]["actor"] and resumed[rank]["critic"] == whole[rank]["critic"]
    assert whole[0]["history"] != whole[1]["history"]  # the ranks ran other prompts: each rank's own figures
    assert whole[0]["actor"] == whole[1]["actor"]
    assert _files(out) == _files(root / "whole") and _files(out)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]
    assert steps == list(range(1, STEPS + 1))  # the killed runs' records after their checkpoints were dropped
