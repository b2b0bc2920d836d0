"""The rows of the three RLHF steps: load, validate, split across the steps, hold out, blend.

A data set is one local file: JSON (a list of objects), JSON Lines or parquet, read through the
`datasets` library from disk only (`Dataset.from_json` / `Dataset.from_parquet`: no hub, no network); or a data set's
name or folder, `name[:config][@split]` (named_data.py: `datasets.load_dataset`, from its cache when offline).
Each step reads the fields it needs:

    sft     prompt, response     (or prompt, completion; or prompt, chosen: a preference file feeds SFT its chosen side)
    reward  prompt, chosen, rejected
    ppo     prompt               (from any of the three kinds of file)

TRL's formats are read too (formats.py): conversational texts (lists of messages), `messages` rows, and
preference rows whose prompt is the shared start of chosen and rejected; a conversational prompt stays a list of
messages (MESSAGES) for the chat template.

Every row of every file is checked before any training starts: a missing (or null) field, an empty
text or a value that is not a string raises a ValueError that names the file, the row (1-based as
the user sees it: the line of a JSON Lines file, the position in a JSON list or a parquet file) and
the field.

As DeepSpeed-Chat's `--data_split 2,4,4` (dschat/utils/data/data_utils.py), each data set is split
by a seeded permutation into three disjoint parts in those proportions, and step k only ever sees
part k, so no step trains on another step's rows. Part k is then split again into training rows and
`eval_fraction` held-out rows, and the training rows of several data sets are blended by weight.
Unlike DeepSpeed-Chat, the part boundaries are the rounded cumulative fractions, so a part with
fraction 0 is always empty and the parts always cover the data set exactly. WHOLE_FILE gives a file
wholly to one step (what `hybrid-engine sft`, `reward` and `ppo` do with their --data files).

PPO keeps every column of its files, not only `prompt`: the reward and evaluation functions receive the
other columns as keyword arguments (one list each), with the types the file gives them (an `answer: 7`
arrives as the int 7). A file without a column another file has gets None in it.

`datasets` keys its cache on a file's path and modification time, so a file replaced with its old mtime
kept (`cp -p`, `rsync -a`, `tar`) would read back the old rows; each file is therefore converted into a
cache folder of its own content (content_cache: the SHA-256 of its bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

from hybrid_engine.rlhf import formats, named_data

STEPS = ("sft", "reward", "ppo")
FIELDS = {"sft": ("prompt", "response"), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
READS = {"sft": "prompt and completion (or response, or chosen), or messages",
         "reward": "prompt, chosen and rejected, or chosen and rejected that start with their prompt",
         "ppo": "prompt, messages, or chosen and rejected that start with their prompt"}
"""What each step reads, in words, for the error messages (each text a string or TRL's list of messages)."""
WHOLE_FILE = {"sft": "1,0,0", "reward": "0,1,0", "ppo": "0,0,1"}
"""The data_split that gives a file wholly to one step."""
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
"""The type of a conversational prompt's column: TRL's list of messages."""
REWARD_EXTRAS = ("completion_ids", "trainer_state", "log_metric", "log_extra")
"""TRL's keyword arguments of a reward function beyond prompts, completions and the row's columns."""
RESERVED = ("prompts", "completions", *REWARD_EXTRAS)
"""The reward function's own arguments, which a PPO file's columns cannot be named."""


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

    def __post_init__(self):
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{self.path}: the blend weight must be a finite number >= 0, got {self.weight}")
        if self.data_split is not None:
            parse_split(self.data_split, f"{self.path}: data_split")


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
    """Where `datasets` caches the files it converts to Arrow, in a folder per file content (content_cache);
    None: its default cache."""

    def __post_init__(self):
        parse_split(self.data_split)
        check_eval_fraction(self.eval_fraction)


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
    data_split: str = ""
    """The split it was cut by (its own or DataConfig.data_split)."""


@dataclass
class StepData:
    """A step's rows: columns FIELDS[step], all strings (PPO: then the files' other columns)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    reports: list[DatasetReport]
    train_origins: list[tuple[str, int]] | None = None
    """Where each training row comes from: its file (or data set) and its row there, numbered as the data errors
    number them (the line of a JSON Lines file, else the position from 1); None when not known (rows given as
    they are)."""


def example_row(data: StepData, examples: Sequence[dict], what: str, i: int) -> str:
    """Tokenized training example i (tokens.tokenize_sft's or tokenize_reward's: each holds its "row" in data.train)
    named as the user's data names it: its file and row there (data.train_origins), else `what` and its position
    among the training rows ("training row 7")."""
    row = examples[i]["row"]
    if data.train_origins is None:
        return f"{what} {row}"
    where, number = data.train_origins[row]
    return f"{where}, row {number}"


# -- loading and validation -----------------------------------------------------------------------


def step_fields(step: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The file's fields that `step` reads, in the order of FIELDS[step]."""
    if step not in FIELDS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if step == "sft" and "response" not in columns and "completion" in columns:
        return ("prompt", "completion")
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


def check_columns(path: str | Path, step: str, fields: Sequence[str], columns: Sequence[str]) -> None:
    """A one-line ValueError when the file has no column for a field `step` reads."""
    missing = [f for f in fields if f not in columns]
    if missing:
        have = ", ".join(repr(c) for c in columns) or "none"
        raise ValueError(f"{path}: no {' or '.join(repr(f) for f in missing)} column; the {step} step reads "
                         f"{READS[step]}, the file has {have}")
    if step == "ppo":
        check_reserved(path, columns)


def check_reserved(path: str | Path, columns: Sequence[str]) -> None:
    """A one-line ValueError when a PPO file has a column named as one of the reward function's own arguments."""
    if clash := [c for c in columns if c in RESERVED]:
        raise ValueError(f"{path}: a column may not be named {clash[0]!r}: the reward function takes its other "
                         f"columns as keyword arguments beside {', '.join(RESERVED)}; rename it")


def content_cache(path: Path, cache_dir: str | None) -> str:
    """The `datasets` cache folder for this file's content: CACHE/by-content/<SHA-256 of its bytes>.

    `datasets` finds a converted file in its cache by the file's path and mtime alone; a folder per content
    never holds the rows of another content, whatever the mtime says."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return str(Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "by-content" / digest[:32])


def decode_text(path: Path, data: bytes) -> str:
    """`data` (the bytes of file `path`) as UTF-8 text; a one-line ValueError naming the file and line (row, for
    JSON Lines) otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        where = f"row {line}" if path.suffix.lower() == ".jsonl" else f"line {line}"
        raise ValueError(f"{path}, {where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "data files must be UTF-8") from None


def read_json_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, parsed row) of a JSON list (numbered by position) or JSON Lines file (by line)."""
    text = decode_text(path, path.read_bytes())
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


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _mixed_column(path: Path, rows: Sequence[tuple[int, dict]], names: Sequence[str]) -> str | None:
    """A message naming the first column of `names` whose values are of two kinds, with the rows; None: none is."""
    for name in names:
        first = None
        for number, row in rows:
            kind = _kind(row.get(name))
            if kind is None:
                continue
            if first is None:
                first = (number, kind)
            elif kind != first[1]:
                return (f"{path}, row {number}: column {name!r} holds a {kind} where row {first[0]} holds a "
                        f"{first[1]}; a column the reward function receives must hold one type")
    return None


def _from_rows(path: Path, rows: Sequence[tuple[int, dict]], keep: Sequence[str]) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list([{k: row.get(k) for k in keep} for _, row in rows])
    except (pa.ArrowException, ValueError, TypeError) as e:
        raise ValueError(_mixed_column(path, rows, keep) or f"{path}: columns {list(keep)} do not fit one table: "
                         f"{str(e).splitlines()[0]}") from None


Read = tuple[datasets.Dataset, tuple[str, ...], list[int]]
"""A file as read: its rows, the fields the step reads, and each row's number in the file (from 1)."""


def _read_json(path: Path, step: str, cache_dir: str | None) -> Read:
    # The rows are checked as Python's parser reads them: exactly what the user wrote, with its line
    # (Arrow's reader types a column a block at a time, so a mixed column comes back coerced, as JSON
    # or as an error without a row). `datasets` then reads the file for training.
    rows = read_json_rows(path)
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    columns = list(dict.fromkeys(k for _, row in rows if isinstance(row, dict) for k in row))
    if _needs_conversion(path, rows, columns, step):
        return _converted(path, rows, step)
    fields = step_fields(step, columns)
    if all(isinstance(row, dict) for _, row in rows):
        check_columns(path, step, fields, columns)
    validate_rows(path, rows, fields)
    extras = [c for c in columns if c not in fields] if step == "ppo" else []
    try:
        ds = datasets.Dataset.from_json(str(path), cache_dir=content_cache(path, cache_dir))
    except (ValueError, DatasetGenerationError):
        ds = None  # a column of mixed types that Arrow cannot hold
    if ds is not None and len(ds) != len(rows):
        raise ValueError(f"{path}: datasets read {len(ds)} rows where the file has {len(rows)}")
    if ds is None or extras and ds.select_columns(extras).to_list() != [{k: r.get(k) for k in extras} for _, r in rows]:
        # What the reward function receives is what the file holds, not Arrow's coercion of it.
        ds = _from_rows(path, rows, [*fields, *extras])
    return ds, fields, [number for number, _ in rows]


def _read_parquet(path: Path, step: str, cache_dir: str | None) -> Read:
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), not a parquet file")
    try:
        names, num_rows = pq.read_schema(path).names, pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
    if num_rows == 0:
        raise ValueError(f"{path}: the file has no rows")
    if _needs_conversion(path, None, names, step):
        ds = datasets.Dataset.from_parquet(str(path), cache_dir=content_cache(path, cache_dir))
        return _converted(path, list(enumerate(ds.to_list(), start=1)), step)
    fields = step_fields(step, names)
    check_columns(path, step, fields, names)
    extras = [c for c in names if c not in fields] if step == "ppo" else []
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=content_cache(path, cache_dir),
                                       columns=[*fields, *extras])
    columns = ds.select_columns(list(fields)).to_dict()
    rows = [(i + 1, {f: columns[f][i] for f in fields}) for i in range(len(ds))]
    validate_rows(path, rows, fields)
    return ds, fields, [number for number, _ in rows]


def _needs_conversion(path: Path, rows: Sequence[tuple[int, Any]] | None, columns: Sequence[str], step: str) -> bool:
    """Whether the file is in one of TRL's formats beyond plain strings (formats.py); its first row tells, for a
    parquet file (rows None) its schema."""
    if rows is None:
        schema = pq.read_schema(path)
        first = {name: [] if pa.types.is_list(schema.field(name).type) else "" for name in columns}
    else:
        first = next((row for _, row in rows if isinstance(row, dict)), {})
    return formats.needs_conversion(columns, first, step)


def _converted(path: str | Path, rows: Sequence[tuple[int, Any]], step: str) -> Read:
    """A file in one of TRL's formats, converted row by row into the step's columns (formats.convert)."""
    converted = formats.convert(path, rows, step)
    keep = list(dict.fromkeys(k for _, row in converted for k in row))
    if step == "ppo":
        check_reserved(path, keep)
    return _from_rows(path, converted, keep), FIELDS[step], [number for number, _ in converted]


def _read_named(text: str, step: str, cache_dir: str | None) -> Read:
    """A data set by name or folder (named_data.py), checked as a file's rows are (numbered from 1 in its split)."""
    ds, where = named_data.load_named(text, cache_dir), f"data set {text}"
    rows = list(enumerate(ds.to_list(), start=1))
    if _needs_conversion(Path(text), rows, ds.column_names, step):
        return _converted(where, rows, step)
    fields = step_fields(step, ds.column_names)
    check_columns(where, step, fields, ds.column_names)
    validate_rows(where, rows, fields)
    return ds, fields, [number for number, _ in rows]


def load_file(path: str | Path, step: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Every row of one file (or data set: named_data.py), validated for `step`, as columns FIELDS[step] (all
    strings, the prompt perhaps a list of messages); for PPO, then every other column of the file, as the file
    types it."""
    return load_numbered(path, step, cache_dir)[0]


def load_numbered(path: str | Path, step: str, cache_dir: str | None = None
                  ) -> tuple[datasets.Dataset, list[tuple[str, int]]]:
    """load_file's rows, and where each comes from: (the file, or "data set NAME"; its row number there)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    where = str(path)
    if kind is None and named_data.is_name(str(path)):
        (ds, fields, numbers), where = _read_named(str(path), step, cache_dir), f"data set {path}"
    elif kind is None:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(FORMATS)}, or a data "
                         "set's name or folder")
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    else:
        ds, fields, numbers = (_read_json if kind == "json" else _read_parquet)(path, step, cache_dir)
    extras = [c for c in ds.column_names if c not in fields] if step == "ppo" else []
    ds = ds.select_columns([*fields, *extras])
    renames = {f: canonical for f, canonical in zip(fields, FIELDS[step]) if f != canonical}
    if renames:
        ds = ds.rename_columns(renames)
    features = {f: datasets.Value("string") for f in FIELDS[step]}
    if not isinstance(ds.features["prompt"], datasets.Value):  # a conversational prompt: a list of messages
        features["prompt"] = MESSAGES
    ds = ds.cast(datasets.Features({**features, **{c: ds.features[c] for c in extras}}))
    return ds, [(where, number) for number in numbers]


def same_prompt_kind(files: Sequence[datasets.Dataset]) -> list[datasets.Dataset]:
    """Files whose prompts are all strings or all conversational, so that they blend: beside a conversational file,
    a string prompt becomes the one user message the chat template would have made of it (tokens.format_prompt)."""
    strings = [isinstance(ds.features["prompt"], datasets.Value) for ds in files]
    if all(strings) or not any(strings):
        return list(files)
    out = []
    for ds, string in zip(files, strings):
        if string:
            features = datasets.Features({**ds.features, "prompt": MESSAGES})
            ds = ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]}, features=features)
        out.append(ds)
    return out


def align_columns(parts: Sequence[datasets.Dataset], paths: Sequence[str]) -> list[datasets.Dataset]:
    """PPO's files with the same columns, so that they blend: a column a file lacks is None in its rows; a column
    two files type differently is a ValueError naming both."""
    features, where = {}, {}
    for ds, path in zip(parts, paths):
        for name, feature in ds.features.items():
            known = features.get(name)
            if known is None or known == datasets.Value("null"):
                features[name], where[name] = feature, path
            elif feature != known and feature != datasets.Value("null"):
                raise ValueError(f"column {name!r} is {feature} in {path} but {known} in {where[name]}; give it one "
                                 "type in every file")
    if all(list(ds.features.items()) == list(features.items()) for ds in parts):
        return list(parts)
    out = []
    for ds in parts:
        for name, feature in features.items():
            if name not in ds.column_names:
                ds = ds.add_column(name, [None] * len(ds), feature=feature)
        out.append(ds.select_columns(list(features)).cast(datasets.Features(features)))
    return out


# -- split, hold-out, blend -----------------------------------------------------------------------


def parse_split(data_split: str, name: str = "data_split") -> tuple[float, float, float]:
    """"2,4,4" -> (0.2, 0.4, 0.4): the three steps' shares, normalized; `name` is the setting the error names."""
    try:
        shares = [float(s) for s in data_split.split(",")]
    except (ValueError, AttributeError):
        shares = []
    if len(shares) != 3 or not all(math.isfinite(s) and s >= 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"{name} must be three finite numbers >= 0, not all 0, like '2,4,4'; got {data_split!r}")
    total = sum(shares)
    return tuple(s / total for s in shares)


def check_eval_fraction(eval_fraction: float, name: str = "eval_fraction") -> None:
    if not 0 <= eval_fraction < 1:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {eval_fraction}")


def split_indices(num_rows: int, data_split: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps' disjoint parts of range(num_rows), each in the seeded permutation's order."""
    order = np.random.default_rng(seed).permutation(num_rows)
    bounds = np.rint(np.cumsum((0.0,) + parse_split(data_split)) * num_rows).astype(np.int64)
    bounds[-1] = num_rows
    return tuple(order[bounds[k]:bounds[k + 1]] for k in range(3))


def holdout(part: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) of one step's part, both sorted: the part's first indices are held out."""
    check_eval_fraction(eval_fraction)
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
          num_rows: int | None = None, origins: Sequence[Sequence] | None = None
          ) -> tuple[datasets.Dataset, list[int], list | None]:
    """The shuffled blend of `parts`, the rows drawn from each, and where each blended row comes from
    (origins[k][i]: row i of part k's; None without origins); weights None: every row once."""
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
    picked = [np.arange(s) for s in sizes] if weights is None else [draw(s, c, rng) for s, c in zip(sizes, counts)]
    starts = np.cumsum([0, *sizes[:-1]])
    rows = np.concatenate([start + p for start, p in zip(starts, picked)]).astype(np.int64)
    order = rows[rng.permutation(len(rows))]  # indices into the parts end to end
    mixed = datasets.concatenate_datasets(list(parts)).select(order)
    if origins is None:
        return mixed, counts, None
    every = [o for part in origins for o in part]
    return mixed, counts, [every[i] for i in order]


def load_step_data(config: DataConfig, step: str) -> StepData:
    """Validate every file of `config`, then take this step's part of each, hold out, and blend."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if not config.datasets:
        raise ValueError("DataConfig.datasets is empty: give at least one data file")
    weights = [spec.weight for spec in config.datasets]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError("give every data set a weight, or none")
    files, numbered = zip(*[load_numbered(spec.path, step, config.cache_dir) for spec in config.datasets])
    files = same_prompt_kind(files)
    if step == "ppo" and len(files) > 1:
        files = align_columns(files, [spec.path for spec in config.datasets])
    trains, evals, reports, origins = [], [], [], []
    for spec, ds, rows in zip(config.datasets, files, numbered):
        data_split = spec.data_split or config.data_split
        parts = split_indices(len(ds), data_split, config.seed)
        train_idx, eval_idx = holdout(parts[STEPS.index(step)], config.eval_fraction)
        trains.append(ds.select(train_idx))
        evals.append(ds.select(eval_idx))
        origins.append([rows[i] for i in train_idx])
        reports.append(DatasetReport(spec.path, len(ds), len(train_idx) + len(eval_idx), len(train_idx),
                                     len(eval_idx), 0, data_split))
    train, counts, train_origins = blend(trains, None if weights[0] is None else weights, config.seed,
                                         config.blend_rows, origins)
    for report, count in zip(reports, counts):
        report.blended_rows = count
    return StepData(train=train, eval=datasets.concatenate_datasets(evals), reports=reports,
                    train_origins=train_origins)
