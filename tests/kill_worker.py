"""Run by torchrun for tests/test_kill_distributed.py: `hybrid-engine ARGS` (the command line's main) in each rank,
with two test hooks that stop rank 0 where a SIGKILL is wanted, and a record of what each rank trained.

KILL_HOLD=step:N: rank 0 stops in step N (1-based) after its generation, before scoring (rank 1 waits in step N's
next collective); KILL_HOLD=rename:N: rank 0 stops when it would rename checkpoints/.step-N.tmp into place (every
rank's files are written). Either way rank 0 writes KILL_READY (a file) and sleeps until it is killed. With
KILL_RECORD=folder, each rank writes rank<r>.json there: its PPO history (without timings) and its weights'
digests."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from hybrid_engine.commands import ppo as ppo_command
from hybrid_engine.commands.main import main
from hybrid_engine.engine.zero import gathered
from hybrid_engine.rlhf.ppo import driver

HOLD = os.environ.get("KILL_HOLD", "")
RANK = int(os.environ["RANK"])
_step = [0]  # the 1-based step rank 0 is in


def hold() -> None:
    """Rank 0 says it is stopped, then sleeps until the test kills it."""
    Path(os.environ["KILL_READY"]).write_text(f"{HOLD}\n")
    while True:
        time.sleep(1)


def hooked_step(run, prompts, indices, step):
    _step[0] = step + 1
    return real_step(run, prompts, indices, step)


def hooked_score(*args, **kwargs):
    if RANK == 0 and HOLD == f"step:{_step[0]}":
        hold()
    return real_score(*args, **kwargs)


def hooked_replace(src, dst):
    if RANK == 0 and HOLD.startswith("rename:") and Path(src).name == f".step-{HOLD[len('rename:'):]}.tmp":
        hold()
    return real_replace(src, dst)


def weights_digest(module: torch.nn.Module | None) -> str | None:
    """A digest of every bit of every weight (ZeRO-3's partitions gathered whole); None for no model (GRPO's
    critic)."""
    if module is None:
        return None
    digest = hashlib.sha256()
    with gathered(list(module.parameters())):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recorded_train_ppo(*args, **kwargs):
    result = real_train_ppo(*args, **kwargs)
    record = {"history": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in result.history],
              "actor": weights_digest(result.actor.module), "critic": weights_digest(result.critic)}
    folder = os.environ.get("KILL_RECORD")
    if folder:
        Path(folder, f"rank{RANK}.json").write_text(json.dumps(record, indent=1))
    return result


real_step, driver.ppo_step = driver.ppo_step, hooked_step
real_score, driver.score = driver.score, hooked_score
real_replace, os.replace = os.replace, hooked_replace
real_train_ppo, ppo_command.train_ppo = ppo_command.train_ppo, recorded_train_ppo

if __name__ == "__main__":
    sys.exit(main())
