"""Whose learning rate a step trains with when --ds-config brings an optimizer with its own optimizer.params.lr:
the step config's lr when the user gave one (a flag, or a key of the config file), with a note saying so; else the
DeepSpeed config's, taken into the step config, so that the summary and the checkpoints record the lr in use."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping

from hybrid_engine.engine.training import load_ds_config
from hybrid_engine.rlhf.distributed import is_main_rank

LR_FIELDS = ("lr", "critic_lr")
"""The step configs' learning rates a DeepSpeed optimizer's lr stands for (PPO's critic trains under the same
optimizer settings as its actor)."""


def ds_optimizer_lr(ds_config) -> float | None:
    """optimizer.params.lr of a DeepSpeed config (a dict or a JSON path); None when it has no optimizer, no lr, or
    "auto" (the step config's lr, as the Hugging Face integration reads it)."""
    if ds_config is None:
        return None
    lr = load_ds_config(ds_config).get("optimizer", {}).get("params", {}).get("lr")
    if lr is None or lr == "auto":
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"--ds-config {ds_config}: optimizer.params.lr must be a positive number, got {lr!r}")
    return float(lr)


def given_lrs(names: Mapping, source: str) -> dict[str, str]:
    """{learning-rate field: `source`} of those among `names` (flags or file keys given)."""
    return {name: source for name in LR_FIELDS if name in names}


def lr_from_ds_config(config, given: dict[str, str], ds_config, step: str):
    """`config` with each learning rate not in `given` ({field: where it was given}) set to the DeepSpeed config's
    optimizer.params.lr; one given that differs from it is kept, with a note on stderr."""
    ds_lr = ds_optimizer_lr(ds_config)
    if ds_lr is None:
        return config
    names = [f.name for f in dataclasses.fields(config) if f.name in LR_FIELDS]
    for name in names:
        value = getattr(config, name)
        if name in given and value != ds_lr and is_main_rank():
            print(f"note: {step}: {name} {value:g} ({given[name]}) is used, not the DeepSpeed config's "
                  f"optimizer.params.lr {ds_lr:g}", file=sys.stderr)
    taken = {name: ds_lr for name in names if name not in given}
    return dataclasses.replace(config, **taken) if taken else config
