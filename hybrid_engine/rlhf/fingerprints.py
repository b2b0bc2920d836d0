"""Fingerprints of what defines a run besides its config, recorded in its checkpoints (checkpoint.check_same_run
compares them on resume): its rows, a model's weights, a reward or eval function."""

from __future__ import annotations

import hashlib
import inspect
import json

import torch

from hybrid_engine.engine.zero import gathered


def rows_fingerprint(*row_sets) -> str | None:
    """SHA-256 of the rows (datasets.Dataset or lists of dicts), in order; None for no row sets."""
    if all(rows is None for rows in row_sets):
        return None
    digest = hashlib.sha256()
    for rows in row_sets:
        digest.update(b"\x00rows")
        if rows is None:
            continue
        if hasattr(rows, "with_format"):  # a datasets.Dataset: its selected rows, a batch of them at a time
            for start in range(0, len(rows), 4096):
                batch = rows.with_format("arrow")[start:start + 4096].to_pylist()
                digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
        else:
            digest.update(json.dumps(list(rows), sort_keys=True, default=str).encode())
    return digest.hexdigest()


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module | None) -> str | None:
    """A fingerprint of a model's weights as they are: every tensor's name, shape, dtype and an even sample of up
    to 4096 of its values (two fine-tunes of one model differ everywhere), so a model of any size is cheap. ZeRO-3
    partitioned parameters are gathered one at a time, so the fingerprint is the whole model's on every rank: under
    ZeRO-3 every rank must call it, in the same order."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        with gathered([tensor]):  # a ZeRO-3 partition is read whole (every rank runs this, in the same order)
            flat = tensor.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float64)
            shape = tuple(tensor.shape)
        digest.update(f"{name}{shape}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def function_fingerprint(fn) -> str | None:
    """A reward or eval function by its name and source (a changed rule file is another function)."""
    if fn is None:
        return None
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"
