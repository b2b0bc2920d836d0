"""The DeepSpeed op a --ds-config's `optimizer` section makes DeepSpeed compile, announced before the compile starts.

With an `optimizer` section DeepSpeed builds its own optimizer, and for Adam, AdamW, Lamb or Lion that is a C++ op it
JIT-compiles on first use (FusedAdam, or CPUAdam under optimizer offload: 156 s on 2 CPU cores, for a run that then
trains in under a second). Without the section our trainers hand DeepSpeed torch's AdamW (fused;
hybrid_engine/engine/training.py), which compiles nothing. `"torch_adam": true` in the section's params does the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.utils import cpp_extension

from hybrid_engine.engine.training import load_ds_config

# DeepSpeed's optimizer type -> (its op, its op under ZeRO optimizer offload to the CPU); DeepSpeed's own names.
OPS = {"adam": ("fused_adam", "cpu_adam"), "adamw": ("fused_adam", "cpu_adam"), "lamb": ("fused_lamb", "fused_lamb"),
       "lion": ("fused_lion", "cpu_lion")}


def optimizer_op(ds_config: dict) -> str | None:
    """The op DeepSpeed compiles for the config's `optimizer` section; None without one, with torch_adam, or for an
    optimizer that needs none."""
    section = ds_config.get("optimizer")
    if not isinstance(section, dict) or (section.get("params") or {}).get("torch_adam"):
        return None
    ops = OPS.get(str(section.get("type", "")).lower())
    if ops is None:
        return None
    offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") == "cpu"
    return ops[offload]


def build_note(path: str | os.PathLike) -> str | None:
    """The note to print before training under the DeepSpeed config at `path`: which op DeepSpeed will compile,
    where it caches it and how to do without; None where nothing is to compile (or it is already built)."""
    config = load_ds_config(path)
    op = optimizer_op(config)
    if op is None:
        return None
    directory = Path(cpp_extension._get_build_directory(op, verbose=False))
    if (directory / f"{op}.so").exists():
        return None
    return (f"note: {path} has an `optimizer` section ({config['optimizer']['type']}): DeepSpeed compiles its {op} op "
            f"before the first step (minutes on a CPU, once; cached in {directory}). Without the section training "
            "uses torch's AdamW, which needs no compile")


def announce_optimizer_build(path: str | os.PathLike | None) -> None:
    """Prints build_note(path), if any, on the first rank."""
    note = build_note(path) if path else None
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr, flush=True)
