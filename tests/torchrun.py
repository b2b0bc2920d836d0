"""Starting a test worker in several processes with torchrun (gloo, CPU, one thread each), on a free port, and
reading what each rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def torchrun_command(worker: Path, args: list[str], nproc: int = 2) -> list[str]:
    """The command line that starts `worker ARGS` in `nproc` processes under torchrun, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), str(worker), *args]


def run_workers(worker: Path, args: list[str], nproc: int = 2, timeout: float = 900) -> None:
    """Runs `worker` with `args` in `nproc` processes; a failure fails the test with the end of their output."""
    env = {**os.environ, **WORKER_ENV}
    cmd = torchrun_command(worker, args, nproc)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun --nproc_per_node {nproc} {worker.name} failed:\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")


def run_ranks(worker: Path, out: Path, nproc: int = 2) -> list[dict]:
    """`worker OUT` on `nproc` torchrun ranks; each rank's OUT/rank<r>.json."""
    run_workers(worker, [str(out)], nproc, timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
