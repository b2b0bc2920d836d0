"""--data by name or folder (rlhf/named_data.py): a folder of data files, a save_to_disk folder, a split and a config,
checked row by row as a file is; a name that is not in the offline cache fails at once, naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import datasets
import pytest

from hybrid_engine.commands.common import parse_data
from hybrid_engine.rlhf.data import load_file
from hybrid_engine.rlhf.named_data import parse_name

TRAIN = [{"prompt": f"tell me about a fox {i}", "completion": f"it is quick {i}"} for i in range(3)]
TEST = [{"prompt": "tell me about a dog", "completion": "it is lazy"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def expected(rows):
    return [{"prompt": r["prompt"], "response": r["completion"]} for r in rows]


def test_a_folder_of_data_files_by_split(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN)
    write_jsonl(folder / "test.jsonl", TEST)
    cache = str(tmp_path / "cache")
    assert load_file(str(folder), "sft", cache).to_list() == expected(TRAIN)
    assert load_file(f"{folder}@test", "sft", cache).to_list() == expected(TEST)
    with pytest.raises(ValueError, match=f"data set {folder}@nope: "):
        load_file(f"{folder}@nope", "sft", cache)


def test_a_saved_dataset_and_dataset_dict(tmp_path):
    pairs = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "one"))
    assert load_file(str(tmp_path / "one"), "reward").to_list() == [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]  # TRL's implicit prompt
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN), "test": datasets.Dataset.from_list(TEST)}
                         ).save_to_disk(str(tmp_path / "two"))
    assert load_file(f"{tmp_path / 'two'}@test", "sft").to_list() == expected(TEST)
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_file(f"{tmp_path / 'two'}@dev", "sft")


def test_a_bad_row_of_a_data_set_is_named(tmp_path):
    datasets.Dataset.from_list([*TRAIN, {"prompt": " ", "completion": "x"}]).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=f"data set {tmp_path / 'd'}, row 4: field 'prompt' must be a non-empty"):
        load_file(str(tmp_path / "d"), "sft")


def test_a_name_missing_from_the_offline_cache_fails_at_once_naming_it(tmp_path):
    code = ("from hybrid_engine.rlhf.data import load_file\n"
            "try:\n    load_file('nobody-here/no-such-data:main@test', 'sft')\n"
            "except ValueError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.startswith("data set nobody-here/no-such-data:main@test: cannot be read ("), proc.stderr[-2000:]
    assert time.perf_counter() - start < 60  # no retries over a network it may not use


@pytest.mark.parametrize("text, parsed", [("trl-lib/tldr", ("trl-lib/tldr", None, "train")),
                                          ("openai/gsm8k:main@test", ("openai/gsm8k", "main", "test")),
                                          ("data/folder@validation", ("data/folder", None, "validation"))])
def test_names_configs_and_splits(text, parsed):
    assert parse_name(text) == parsed
    assert parse_data(text).path == text and parse_data(text).weight is None  # not PATH:WEIGHT


@pytest.mark.parametrize("text", ["org/name:", "org/name@", "@train"])
def test_a_malformed_name_is_refused(text):
    with pytest.raises(ValueError, match=r"NAME\[:CONFIG\]\[@SPLIT\]"):
        parse_name(text)
