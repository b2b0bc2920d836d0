"""Whose gradient accumulation a step trains with when its DeepSpeed config (--ds-config, ds_config in --config, or
accelerate launch's gradient_accumulation_steps) sets gradient_accumulation_steps: the step config's when the user
gave one (a flag, or a key of the config file); else the DeepSpeed config's, taken into the step config. A given one
that differs is refused by the library (rlhf/trainer.training_ds_config), before any work (rlhf/preflight.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

FIELD = "gradient_accumulation_steps"


def ds_accumulation(ds_config) -> int | None:
    """gradient_accumulation_steps of a DeepSpeed config (a dict or a JSON path) as written; None when it has none,
    or "auto" (the step config's, as the Hugging Face integration reads it)."""
    if ds_config is None:
        return None
    if not isinstance(ds_config, dict):
        path = Path(os.fspath(ds_config))
        ds_config = json.loads(path.read_text()) if path.is_file() else {}  # a missing file: load_ds_config says
    value = ds_config.get(FIELD) if isinstance(ds_config, dict) else None
    return None if value is None or value == "auto" else value


def accumulation_from_ds_config(config, given: Iterable[str], ds_config):
    """`config` with gradient_accumulation_steps taken from `ds_config` unless it is among `given` (the settings
    the user gave as flags or file keys)."""
    value = ds_accumulation(ds_config)
    if value is None or FIELD in set(given) or value == config.gradient_accumulation_steps:
        return config
    return dataclasses.replace(config, **{FIELD: value})  # checked again: it must divide the batch
