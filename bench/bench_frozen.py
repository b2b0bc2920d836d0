"""Peak memory per rank of a PPO run under DeepSpeed ZeRO-3 on 2 torchrun ranks, with the frozen reference and reward
model partitioned across the ranks (PPOConfig.partition_frozen, the default) against whole on each rank (as before):
bench/frozen_worker.py, one torchrun launch (gloo, one thread a rank) per mode, a ~50M-parameter Llama (hidden 512 x
16 layers over the demo tokenizer) as actor, critic, reference and reward model.

    pytest bench/bench_frozen.py --benchmark-only --sweeps --benchmark-json=bench/results/frozen_zero3.json

takes about 10 minutes on 2 cores (without --sweeps: the partitioned run with freed memory kept alone).

Each mode runs with PPOConfig.keep_freed_memory (the default: freed memory stays in the process for the next step, so
the resident size stays at its peak, which is the models' load, where every model is whole) and without it (malloc's
default, which hands large freed blocks back: the resident size follows what is live).

Each rank reports the bytes of the frozen models' parameters it holds, the most a partitioned model gathers at once
(the rule of engine/frozen.py, computed), its resident memory after the first step, its peak resident memory during
the second step, and that step's phase times (the score phase is where the gathers happen).
`hybrid-engine bench report --only frozen_zero3 --docs docs` writes the table into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import representative

WORKER = Path(__file__).with_name("frozen_worker.py")
MODES = ("whole", "partitioned")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, keep_freed: bool, out: Path) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(WORKER), mode, str(out), "--keep-freed-memory" if keep_freed else
           "--no-keep-freed-memory"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"frozen_worker.py {mode} failed:\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("keep_freed", representative([True, False], True), ids=["keep-freed", "malloc-default"])
@pytest.mark.parametrize("mode", representative(MODES, "partitioned"))
def test_frozen_zero3(benchmark, mode, keep_freed, machine, tmp_path):
    ranks = _run(mode, keep_freed, tmp_path)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the worker's, below
    benchmark.extra_info.update(machine, mode=mode, keep_freed_memory=keep_freed, ranks=ranks)
