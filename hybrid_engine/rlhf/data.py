"""The rows of the three RLHF steps: load, validate, split across the steps, hold out, blend.

A data set is one local file: JSON (a list of objects), JSON Lines or parquet, read through the
`datasets` library from disk only (`Dataset.from_json` / `Dataset.from_parquet`: no hub, no network).
Each step reads the fields it needs:

    sft     prompt, response     (or prompt, chosen: a preference file feeds SFT with its chosen side)
    reward  prompt, chosen, rejected
    ppo     prompt               (from any of the three kinds of file)

Every row of every file is checked before any training starts: a missing (or null) field, an empty
text or a value that is not a string raises a ValueError that names the file, the row (1-based as
the user sees it: the line of a JSON Lines file, the position in a JSON list or a parquet file) and
the field.

As DeepSpeed-Chat's `--data_split 2,4,4` (dschat/utils/data/data_utils.py), each data set is split
by a seeded permutation into three disjoint parts in those proportions, and step k only ever sees
part k, so no step trains on another step's rows. Part k is then split again into training rows and
`eval_fraction` held-out rows, and the training rows of several data sets are blended by weight.
Unlike DeepSpeed-Chat, the part boundaries are the rounded cumulative fractions, so a part with
fraction 0 is always empty and the parts always cover the data set exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

STEPS = ("sft", "reward", "ppo")
FIELDS = {"sft": ("prompt", "response"), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class DatasetSpec:
    """One data set of a step."""

    path: str
    """A local .json (a list of objects), .jsonl (one object a line) or .parquet file."""
    weight: float | None = None
    """Its share of the blended training rows, relative to the other data sets' weights (give every
    data set a weight, or none: then each training row is used once, as a plain concatenation)."""
    data_split: str | None = None
    """Its own split across the three steps, like DataConfig.data_split ("1,0,0" gives a file made for
    SFT wholly to SFT); None uses DataConfig.data_split."""


@dataclass
class DataConfig:
    """The data of one step: which files, how each is split across steps, held out and blended."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """The data sets, blended in this order."""
    data_split: str = "2,4,4"
    """Relative shares of every data set for SFT, reward and PPO (DeepSpeed-Chat's --data_split)."""
    eval_fraction: float = 0.1
    """The fraction of this step's part of each data set held out for evaluation (at least one row
    when the part has two or more)."""
    seed: int = 1234
    """Seeds the split, the hold-out and the blend (DeepSpeed-Chat's default seed)."""
    blend_rows: int | None = None
    """Training rows in the weighted blend; None: as many as the data sets' training rows together."""
    cache_dir: str | None = None
    """Where `datasets` caches the files it converts to Arrow; None: its default cache."""


@dataclass
class DatasetReport:
    """Where one data set's rows went, for the trainer's log."""

    path: str
    rows: int
    """Rows in the file."""
    step_rows: int
    """Rows in this step's part of the split."""
    train_rows: int
    """Of those, rows left for training."""
    eval_rows: int
    """Of those, rows held out for evaluation."""
    blended_rows: int
    """Training rows drawn from it into the blend (repeats counted)."""


@dataclass
class StepData:
    """A step's rows: columns FIELDS[step], all strings."""

    train: datasets.Dataset
    eval: datasets.Dataset
    reports: list[DatasetReport]


# -- loading and validation -----------------------------------------------------------------------


def step_fields(step: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The file's fields that `step` reads, in the order of FIELDS[step]."""
    if step not in FIELDS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if step == "sft" and "response" not in columns and "chosen" in columns:
        return ("prompt", "chosen")
    return FIELDS[step]


def _problem(value: Any, name: str) -> str | None:
    if value is None:
        return f"field {name!r} is missing"
    if not isinstance(value, str):
        return f"field {name!r} must be a string, got {type(value).__name__} {value!r:.40}"
    if not value.strip():
        return f"field {name!r} is empty"
    return None


def validate_rows(path: str | Path, rows: Sequence[tuple[int, Any]], fields: Sequence[str]) -> None:
    """Raise a ValueError naming the file, row and field of every bad (row number, row) in `rows`."""
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    problems = []
    for number, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{path}, row {number}: not a JSON object but {type(row).__name__}")
            continue
        problems += [f"{path}, row {number}: {p}" for f in fields if (p := _problem(row.get(f), f))]
    if problems:
        more = f"\n... and {len(problems) - 5} more problems" if len(problems) > 5 else ""
        raise ValueError("bad rows:\n" + "\n".join(problems[:5]) + more)


def read_json_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, parsed row) of a JSON list (numbered by position) or JSON Lines file (by line)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return list(enumerate(rows, start=1))
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, row {number}: not valid JSON: {e.msg}") from None
    return out


def _read_json(path: Path, step: str, cache_dir: str | None) -> tuple[datasets.Dataset, tuple[str, ...]]:
    # The rows are checked as Python's parser reads them: exactly what the user wrote, with its line
    # (Arrow's reader types a column a block at a time, so a mixed column comes back coerced, as JSON
    # or as an error without a row). `datasets` then reads the file for training.
    rows = read_json_rows(path)
    columns = {k for _, row in rows if isinstance(row, dict) for k in row}
    fields = step_fields(step, sorted(columns))
    validate_rows(path, rows, fields)
    try:
        ds = datasets.Dataset.from_json(str(path), cache_dir=cache_dir)
    except (ValueError, DatasetGenerationError):
        # An extra column of mixed types that Arrow cannot hold; the checked fields are all we need.
        ds = datasets.Dataset.from_list([{f: row[f] for f in fields} for _, row in rows])
    if len(ds) != len(rows):
        raise ValueError(f"{path}: datasets read {len(ds)} rows where the file has {len(rows)}")
    return ds, fields


def _read_parquet(path: Path, step: str, cache_dir: str | None) -> tuple[datasets.Dataset, tuple[str, ...]]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    fields = step_fields(step, names)
    present = [f for f in fields if f in names]
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, columns=present)
    columns = ds.to_dict()
    rows = [(i + 1, {f: columns[f][i] for f in present}) for i in range(len(ds))]
    validate_rows(path, rows, fields)
    return ds, fields


def load_file(path: str | Path, step: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Every row of one file, validated for `step`, as columns FIELDS[step] (all strings)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    reader = _read_json if kind == "json" else _read_parquet
    ds, fields = reader(path, step, cache_dir)
    ds = ds.select_columns(list(fields))
    renames = {f: canonical for f, canonical in zip(fields, FIELDS[step]) if f != canonical}
    if renames:
        ds = ds.rename_columns(renames)
    return ds.cast(datasets.Features({f: datasets.Value("string") for f in FIELDS[step]}))


# -- split, hold-out, blend -----------------------------------------------------------------------


def parse_split(data_split: str) -> tuple[float, float, float]:
    """"2,4,4" -> (0.2, 0.4, 0.4): the three steps' shares, normalized."""
    try:
        shares = [float(s) for s in data_split.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"data_split must be three non-negative numbers, not all 0, like '2,4,4'; got {data_split!r}")
    total = sum(shares)
    return tuple(s / total for s in shares)


def split_indices(num_rows: int, data_split: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps' disjoint parts of range(num_rows), each in the seeded permutation's order."""
    order = np.random.default_rng(seed).permutation(num_rows)
    bounds = np.rint(np.cumsum((0.0,) + parse_split(data_split)) * num_rows).astype(np.int64)
    bounds[-1] = num_rows
    return tuple(order[bounds[k]:bounds[k + 1]] for k in range(3))


def holdout(part: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) of one step's part, both sorted: the part's first indices are held out."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(eval_fraction * len(part)))
    if eval_fraction > 0 and len(part) >= 2:
        n_eval = min(max(n_eval, 1), len(part) - 1)
    return np.sort(part[n_eval:]), np.sort(part[:n_eval])


def blend_counts(weights: Sequence[float], num_rows: int) -> list[int]:
    """Rows per data set: num_rows shared by weight, rounded by largest remainder (sums to num_rows)."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"blend weights must be non-negative and not all 0, got {list(weights)}")
    exact = [w / sum(weights) * num_rows for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:num_rows - sum(counts)]:
        counts[i] += 1
    return counts


def draw(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices of range(size): whole shuffled passes, then the start of one more."""
    passes = [rng.permutation(size) for _ in range(-(-count // size))] if size else []
    return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)


def blend(parts: Sequence[datasets.Dataset], weights: Sequence[float] | None, seed: int,
          num_rows: int | None = None) -> tuple[datasets.Dataset, list[int]]:
    """The shuffled blend of `parts` and the rows drawn from each; weights None: every row once."""
    sizes = [len(p) for p in parts]
    if weights is None:
        counts = sizes
    else:
        if len(weights) != len(parts):
            raise ValueError(f"{len(weights)} weights for {len(parts)} data sets")
        counts = blend_counts(weights, sum(sizes) if num_rows is None else num_rows)
        empty = [i for i, (s, c) in enumerate(zip(sizes, counts)) if c and not s]
        if empty:
            raise ValueError(f"data sets {empty} have weight but no training rows for this step")
    rng = np.random.default_rng((seed, 2))
    picked = list(parts) if weights is None else [p.select(draw(s, c, rng)) for p, s, c in zip(parts, sizes, counts)]
    mixed = datasets.concatenate_datasets(picked)
    return mixed.select(rng.permutation(len(mixed))), counts


def load_step_data(config: DataConfig, step: str) -> StepData:
    """Validate every file of `config`, then take this step's part of each, hold out, and blend."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if not config.datasets:
        raise ValueError("DataConfig.datasets is empty: give at least one data file")
    weights = [spec.weight for spec in config.datasets]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError("give every data set a weight, or none")
    files = [load_file(spec.path, step, config.cache_dir) for spec in config.datasets]  # all checked first
    trains, evals, reports = [], [], []
    for spec, ds in zip(config.datasets, files):
        parts = split_indices(len(ds), spec.data_split or config.data_split, config.seed)
        train_idx, eval_idx = holdout(parts[STEPS.index(step)], config.eval_fraction)
        trains.append(ds.select(train_idx))
        evals.append(ds.select(eval_idx))
        reports.append(DatasetReport(spec.path, len(ds), len(train_idx) + len(eval_idx), len(train_idx),
                                     len(eval_idx), 0))
    train, counts = blend(trains, None if weights[0] is None else weights, config.seed, config.blend_rows)
    for report, count in zip(reports, counts):
        report.blended_rows = count
    return StepData(train=train, eval=datasets.concatenate_datasets(evals), reports=reports)
