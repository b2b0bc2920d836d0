"""How a torchrun test worker ends: its rank's results written as JSON, then every rank leaving together. A rank that
exits while another still works (rank 0 reloading a saved model, say), with gloo's threads alive, can abort in the
process group's teardown ("terminate called without an active exception")."""

from __future__ import annotations

import json

import torch.distributed as dist


def write_and_leave(path: str, results: dict) -> None:
    """Writes `results` to `path`, waits for every rank, and destroys the process group."""
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
