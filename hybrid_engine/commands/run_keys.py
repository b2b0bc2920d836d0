"""A config file's run settings: the models, data and functions of a run, beside the step's own fields.

    model: out/sft                       # the flags' names, snake_case or kebab-case, at the top level
    data: [rows.jsonl, more.jsonl:0.5]   # a path, or a list of them (PATH[:WEIGHT], as --data takes)
    reward_model: out/reward
    reward_fn: [my_rules.py:score, my_rules.py:brevity]   # one function, or a list
    report_to: [tensorboard, wandb]      # the trackers (--report-to); a name or a list of them
    ppo:
      reward_weights: [1.0, 0.5]
      max_steps: 20

TRL's names are read too: model_name_or_path, dataset_name, reward_funcs, reward_model_name_or_path; report_to
and run_name are TRL's names and ours.
Each is the value of the flag of the same name when that flag is not given: an explicit flag wins over the file.
Paths are read as the flags' are, from the working directory. They are top-level keys only: a run has one model and
one data set, whichever steps it runs (a run setting inside a step's section is refused, saying so).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping

from hybrid_engine.commands import trl_names
from hybrid_engine.commands.config_args import SECTIONS, ConfigValues

KINDS: dict[str, type] = {
    "model": str, "tokenizer": str, "data": list, "demo": bool, "data_split": str, "eval_fraction": float,
    "cache_dir": str, "ds_config": str, "reward_model": str, "no_reward_model": bool, "critic": str,
    "reference": str, "reward_fn": list, "eval_fn": str, "ptx_data": list, "report_to": list, "run_name": str,
}
"""Every run setting a config file may hold, with its type (list: one string or a list of strings)."""
LIST_KINDS = {"reward_fn": "a function or a list of functions", "report_to": "a tracker name or a list of them"}
"""What the list settings that are not paths hold, for the error on a bad one."""
STEP = ("model", "tokenizer", "data", "demo", "data_split", "eval_fraction", "cache_dir", "ds_config", "report_to",
        "run_name")
"""The run settings of `hybrid-engine sft` and `reward`."""
PPO = STEP + ("reward_model", "no_reward_model", "critic", "reference", "reward_fn", "eval_fn", "ptx_data")
"""The run settings of `hybrid-engine ppo`."""
TRAIN = STEP + ("reward_fn", "eval_fn")
"""The run settings of `hybrid-engine train`."""


def _checked(key: str, value, where: str):
    kind = KINDS[key]
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if key == "report_to" and value == []:  # TRL's spelling of no tracker
            return ["none"]
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            what = LIST_KINDS.get(key, "a path or a list of paths")
            raise ValueError(f"{where}: {key!r} must be {what}, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)) or value == "":
        raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def split_run_keys(values: Mapping, keys: Iterable[str]) -> tuple[ConfigValues, dict]:
    """(the file's values without its run settings, {run setting: checked value}) for a command taking `keys`."""
    source = getattr(values, "path", "the config file")
    keys = set(keys)
    for section in SECTIONS:
        inside = values.get(section)
        misplaced = [k for k in inside if str(k).replace("-", "_") in KINDS] if isinstance(inside, Mapping) else []
        if misplaced:
            raise ValueError(f"{source}, section {section!r}: {misplaced[0]!r} is a run setting, not a step's: put it "
                             "at the top level of the file")
    rest, run = {}, {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in trl_names.RUN:  # TRL's name: ours
            name = trl_names.RUN[name]
            if name in run or name in values:
                raise ValueError(f"{source}: {key!r} and {name!r} are one setting (TRL's name and ours); give it once")
        if name in keys:
            run[name] = _checked(name, value, source)
        elif name in KINDS:
            raise ValueError(f"{source}: {key!r} is not a setting of this command (its run settings: "
                             f"{', '.join(sorted(keys))})")
        else:
            rest[key] = value
    return ConfigValues(rest, source), run


def apply_run_keys(args: argparse.Namespace, run: Mapping) -> None:
    """Sets each run setting on `args` whose flag was not given (None, or False for a switch)."""
    for key, value in run.items():
        if getattr(args, key, None) in (None, False):
            setattr(args, key, value)
