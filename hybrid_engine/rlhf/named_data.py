"""A data set given by name rather than by file: `name[:config][@split]`, read with `datasets`.

    trl-lib/tldr                 a Hugging Face dataset's train split (from the local cache when offline)
    openai/gsm8k:main@test       its config "main", split "test"
    path/to/folder@validation    a folder of data files (load_dataset's own layout: train.jsonl, test.jsonl, ...)
    path/to/saved                a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk

Nothing else of the library reaches the Hub: `datasets` does, and only for a name that is not a local folder. With
HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) it reads its cache alone, and a name missing from it fails at once;
without, a machine with no network retries for some seconds first. The rows are checked by data.py as a file's are.
"""

from __future__ import annotations

from pathlib import Path

import datasets

DEFAULT_SPLIT = "train"


def is_name(text: str) -> bool:
    """Whether `text` names a data set rather than a data file: a folder, or a name without a file suffix."""
    return Path(text).is_dir() or Path(text.partition("@")[0].partition(":")[0]).suffix == ""


def parse_name(text: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` -> (name, config or None, split, by default "train")."""
    rest, _, split = text.partition("@")
    name, _, config = rest.partition(":")
    if not name or (":" in text.partition("@")[0] and not config) or ("@" in text and not split):
        raise ValueError(f"--data {text}: a data set is given as NAME[:CONFIG][@SPLIT], e.g. openai/gsm8k:main@test")
    return name, config or None, split or DEFAULT_SPLIT


def _saved(path: Path) -> bool:
    """Whether `path` is a folder written by save_to_disk (a Dataset's state.json, a DatasetDict's dict json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_named(text: str, cache_dir: str | None = None) -> datasets.Dataset:
    """The split `text` names (parse_name); a one-line ValueError naming it when it cannot be read."""
    name, config, split = parse_name(text)
    try:
        if _saved(Path(name)):
            loaded = datasets.load_from_disk(name)
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except KeyError:
        raise ValueError(f"data set {text}: no split {split!r}") from None
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # ConnectionError is an OSError
        raise ValueError(f"data set {text}: cannot be read ({str(e).splitlines()[0]})") from None
    if len(ds) == 0:
        raise ValueError(f"data set {text}: the split has no rows")
    return ds
