"""The RLHF data layer: the demo task, loading and validation, the step split, blending, tokenization."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.exceptions import DatasetGenerationError

from hybrid_engine.rlhf.data import (
    FIELDS,
    DataConfig,
    DatasetSpec,
    blend_counts,
    load_file,
    load_step_data,
    parse_split,
    split_indices,
)
from hybrid_engine.rlhf.demo import DEMO_DIR, demo_config, demo_tokenizer, rule_score
from hybrid_engine.rlhf.tokens import (
    IGNORE_INDEX,
    TokenConfig,
    collate_ppo,
    collate_reward,
    collate_sft,
    encode_prompts,
    format_prompt,
    tokenize_ppo,
    tokenize_reward,
    tokenize_sft,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_SIZES = {"sft": 3000, "reward": 3000, "ppo": 1200}


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int, tag: str = "p") -> list[dict]:
    return [{"prompt": f"{tag}{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


# -- the demo task ----------------------------------------------------------------------------------


def test_demo_files_load_and_validate(cache):
    for step, size in DEMO_SIZES.items():
        ds = load_file(DEMO_DIR / f"{step}.jsonl", step, cache)
        assert len(ds) == size and ds.column_names == list(FIELDS[step])
        data = load_step_data(demo_config(step, cache_dir=cache), step)
        assert len(data.train) + len(data.eval) == size
        assert data.reports[0].step_rows == size
    assert len(load_step_data(demo_config("ppo", cache_dir=cache), "ppo").eval) == 200
    prompts = [r["prompt"] for r in read_jsonl(DEMO_DIR / "ppo.jsonl")]
    assert len(set(prompts)) == len(prompts)


def test_generator_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in DEMO_DIR.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_tokenizer_round_trips_the_demo_text(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    texts = [t for step in DEMO_SIZES for row in read_jsonl(DEMO_DIR / f"{step}.jsonl") for t in row.values()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert tokenizer.batch_decode(ids) == texts
    assert format_prompt(tokenizer, "describe a fox") == "<bos><user> describe a fox <assistant>"
    prompt = encode_prompts(tokenizer, ["describe a fox"])[0]
    assert tokenizer.convert_ids_to_tokens(prompt) == ["<bos>", "<user>", "describe", "a", "fox", "<assistant>"]
    assert len(tokenizer) < 400


def test_rule_score_ranks_chosen_above_rejected():
    assert rule_score("", "") == 0.0 and rule_score("", "the dog") == 0.0
    assert rule_score("", "the dog is lovely") == 1.0 and rule_score("", "happy and sad") == 0.5
    rows = read_jsonl(DEMO_DIR / "reward.jsonl")
    chosen = np.array([rule_score(r["prompt"], r["chosen"]) for r in rows])
    rejected = np.array([rule_score(r["prompt"], r["rejected"]) for r in rows])
    sft = np.array([rule_score(r["prompt"], r["response"]) for r in read_jsonl(DEMO_DIR / "sft.jsonl")])
    for scores in (chosen, rejected, sft):
        assert scores.min() >= 0 and scores.max() <= 1
    assert (chosen > rejected).mean() >= 0.99
    assert 0.3 <= sft.mean() <= 0.4 and chosen.mean() > 0.6 and rejected.mean() < 0.4


# -- loading and validation -------------------------------------------------------------------------

BAD_ROWS = {  # problem: (the bad row, the field named, the words of the message)
    "missing field": ({"prompt": "hi"}, "response", "is missing"),
    "empty prompt": ({"prompt": "  ", "response": "hello"}, "prompt", "is empty"),
    "wrong type": ({"prompt": 7, "response": "hello"}, "prompt", "must be a string"),
}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_bad_rows_name_file_row_and_field(tmp_path, cache, suffix, problem):
    bad, name, words = BAD_ROWS[problem]
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    bad_row = 3
    if suffix == ".parquet" and problem == "wrong type":  # a parquet column has one type
        rows, bad_row = [{"prompt": i, "response": "r"} for i in range(5)], 1
    else:
        rows[2] = bad
    path = write_rows(tmp_path / f"bad{suffix}", rows)
    with pytest.raises(ValueError) as e:
        load_file(path, "sft", cache)
    message = str(e.value)
    assert str(path) in message and f"row {bad_row}:" in message and f"{name!r}" in message and words in message


def test_bad_reward_row_and_bad_json(tmp_path, cache):
    rows = pairs(4)
    rows[1] = {"prompt": "x", "chosen": "y", "rejected": None}
    with pytest.raises(ValueError, match=r"row 2: field 'rejected' is missing"):
        load_file(write_rows(tmp_path / "pairs.jsonl", rows), "reward", cache)
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl, row 2: not valid JSON"):
        load_file(path, "ppo", cache)


def test_extra_columns_are_ignored(tmp_path, cache):
    rows = [{"prompt": "a", "response": "b", "meta": 1}, {"prompt": "c", "response": "d", "meta": ["x"]}]
    ds = load_file(write_rows(tmp_path / "extra.jsonl", rows), "sft", cache)
    assert ds.column_names == ["prompt", "response"] and ds["prompt"] == ["a", "c"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_ppo_keeps_every_column_as_the_file_types_it(tmp_path, cache, suffix):
    rows = [{"prompt": f"p{i}", "answer": i * 7, "tags": ["a", str(i)], "level": None if i else "easy"}
            for i in range(4)]
    ds = load_file(write_rows(tmp_path / f"rows{suffix}", rows), "ppo", cache)
    assert ds.column_names == ["prompt", "answer", "tags", "level"]
    assert ds["answer"] == [0, 7, 14, 21] and ds["tags"][1] == ["a", "1"] and ds["level"] == ["easy", None, None, None]
    assert ds[2] == rows[2]  # a row, as Prompts.fields hands it to the reward function


def test_a_column_of_two_types_reaches_ppo_as_the_file_holds_it(tmp_path, cache, monkeypatch):
    rows = [{"prompt": "a", "answer": 7}, {"prompt": "b", "answer": 8}, {"prompt": "c", "answer": "nine"}]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    assert load_file(path, "ppo", cache)["answer"] == [7, 8, "nine"]
    sft = load_file(write_rows(tmp_path / "sft.jsonl", [{**r, "response": "x"} for r in rows]), "sft", cache)
    assert sft.column_names == ["prompt", "response"] and len(sft) == 3  # SFT reads its fields alone

    def refuse(*args, **kwargs):  # a column Arrow cannot hold: the rows are built from the parsed file instead
        raise DatasetGenerationError("mixed types")

    monkeypatch.setattr(datasets.Dataset, "from_json", refuse)
    with pytest.raises(ValueError) as e:
        load_file(path, "ppo", cache)
    assert str(e.value) == (f"{path}, row 3: column 'answer' holds a string where row 1 holds a number; a column "
                            "the reward function receives must hold one type")


@pytest.mark.parametrize("name", ["completions", "completion_ids", "trainer_state", "log_metric"])
def test_a_ppo_column_named_like_a_reward_function_argument_is_refused(tmp_path, cache, name):
    path = write_rows(tmp_path / "clash.jsonl", [{"prompt": "a", name: "x"}])
    with pytest.raises(ValueError, match=rf"clash\.jsonl: a column may not be named '{name}': the reward function "
                       r"takes its other columns as keyword arguments beside prompts, completions, completion_ids, "
                       r"trainer_state, log_metric, log_extra; rename it"):
        load_file(path, "ppo", cache)


def test_ppo_files_with_different_columns_blend(tmp_path, cache):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "answer": i} for i in range(5)])
    b = write_rows(tmp_path / "b.parquet", [{"prompt": f"b{i}", "source": "web"} for i in range(5)])
    specs = [DatasetSpec(str(a)), DatasetSpec(str(b))]
    data = load_step_data(DataConfig(datasets=specs, data_split="0,0,1", eval_fraction=0.2, cache_dir=cache), "ppo")
    rows = data.train.to_list() + data.eval.to_list()
    assert len(rows) == 10 and data.train.column_names == ["prompt", "answer", "source"]
    assert sorted((r["prompt"], r["answer"], r["source"]) for r in rows) == sorted(
        [(f"a{i}", i, None) for i in range(5)] + [(f"b{i}", None, "web") for i in range(5)])
    c = write_rows(tmp_path / "c.jsonl", [{"prompt": "c", "answer": "seven"}])
    with pytest.raises(ValueError, match=r"column 'answer' is .*string.* in .*c\.jsonl but .*int64.* in .*a\.jsonl"):
        load_step_data(DataConfig(datasets=[DatasetSpec(str(a)), DatasetSpec(str(c))], cache_dir=cache), "ppo")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_file_replaced_with_its_old_mtime_gives_its_new_rows(tmp_path, cache, suffix):
    """`datasets` keys its cache on path and mtime: a file replaced as `cp -p` replaces it must not read back the
    old rows."""
    path = tmp_path / f"rows{suffix}"
    write_rows(path, [{"prompt": f"old {i}", "response": f"r{i}"} for i in range(6)])
    assert load_file(path, "sft", cache)["prompt"][0] == "old 0"
    stat = path.stat()
    write_rows(path, [{"prompt": f"new {i}", "response": f"r{i}"} for i in range(6)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_file(path, "sft", cache)["prompt"] == [f"new {i}" for i in range(6)]
    data = load_step_data(DataConfig(datasets=[DatasetSpec(str(path))], data_split="1,0,0", cache_dir=cache), "sft")
    assert sorted([*data.train["prompt"], *data.eval["prompt"]]) == [f"new {i}" for i in range(6)]


def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path, cache):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert one_line_error(load_file, bad, "ppo", cache) == (f"{bad}, row 2: not UTF-8 text (byte 0xe9 at offset 31); "
                                                            "data files must be UTF-8")
    listed = tmp_path / "latin1.json"
    listed.write_bytes('[\n{"prompt": "caf\u00e9"}\n]'.encode("latin-1"))
    assert one_line_error(load_file, listed, "ppo", cache).startswith(f"{listed}, line 2: not UTF-8 text")

    wrong = write_rows(tmp_path / "wrong.parquet", [{"question": "q", "reply": "r"}] * 3)
    assert one_line_error(load_file, wrong, "sft", cache) == (
        f"{wrong}: no 'prompt' or 'response' column; the sft step reads prompt and completion (or response, or "
        "chosen), or messages, the file has 'question', 'reply'")
    assert "no 'rejected' column; the reward step reads prompt, chosen and rejected" in one_line_error(
        load_file, write_rows(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": "c"}] * 2), "reward", cache)

    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "a"}\n')
    assert one_line_error(load_file, fake, "ppo", cache).startswith(f"{fake}: not a parquet file (")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert one_line_error(load_file, empty, "ppo", cache) == f"{empty}: the file is empty (0 bytes), not a parquet file"
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), no_rows)
    assert one_line_error(load_file, no_rows, "ppo", cache) == f"{no_rows}: the file has no rows"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    assert one_line_error(load_file, blank, "ppo", cache) == f"{blank}: the file has no rows"


@pytest.mark.parametrize("split", ["nan,1,1", "1,inf,1", "1,-1,1", "0,0,0", "2,4", "a,b,c"])
def test_a_split_of_non_finite_or_negative_shares_is_refused(split):
    assert one_line_error(parse_split, split) == (
        f"data_split must be three finite numbers >= 0, not all 0, like '2,4,4'; got {split!r}")
    with pytest.raises(ValueError, match="data_split must be three finite numbers"):
        DataConfig(data_split=split)
    with pytest.raises(ValueError, match=r"a\.jsonl: data_split must be three finite numbers"):
        DatasetSpec("a.jsonl", data_split=split)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_weight_is_refused(weight):
    assert one_line_error(DatasetSpec, "a.jsonl", weight) == (
        f"a.jsonl: the blend weight must be a finite number >= 0, got {weight}")


def test_a_non_finite_eval_fraction_is_refused():
    assert one_line_error(DataConfig, [], "2,4,4", float("nan")) == "eval_fraction must be in [0, 1), got nan"


def test_loading_touches_no_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data layer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for suffix in (".json", ".jsonl", ".parquet"):
        path = write_rows(tmp_path / f"rows{suffix}", pairs(6))
        ds = load_file(path, "sft", str(tmp_path / "cache"))  # SFT reads a preference file's chosen side
        assert ds["response"] == [f"good {i}" for i in range(6)]


# -- the step split, hold-out and blending ----------------------------------------------------------


def test_split_244_is_disjoint_deterministic_and_covers_every_row():
    parts = split_indices(1000, "2,4,4", seed=1234)
    assert [len(p) for p in parts] == [200, 400, 400]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_indices(1000, "2,4,4", seed=1234)))
    assert not np.array_equal(parts[0], split_indices(1000, "2,4,4", seed=1)[0])
    for n in (0, 1, 2, 3, 7, 11):
        assert np.array_equal(np.sort(np.concatenate(split_indices(n, "2,4,4", 0))), np.arange(n))
    assert [len(p) for p in split_indices(7, "0,0,1", 0)] == [0, 0, 7]
    with pytest.raises(ValueError, match="data_split"):
        split_indices(10, "2,4", 0)


def test_steps_never_see_each_others_rows(tmp_path, cache):
    path = write_rows(tmp_path / "pairs.jsonl", pairs(100))
    config = DataConfig(datasets=[DatasetSpec(str(path))], eval_fraction=0.1, cache_dir=cache)
    seen = {}
    for step in ("sft", "reward", "ppo"):
        data = load_step_data(config, step)
        train, held = set(data.train["prompt"]), set(data.eval["prompt"])
        assert not train & held and len(train) == len(data.train)
        seen[step] = train | held
        assert load_step_data(config, step).train["prompt"] == data.train["prompt"]  # deterministic
    assert [len(seen[s]) for s in ("sft", "reward", "ppo")] == [20, 40, 40]
    assert set.union(*seen.values()) == {f"p{i}" for i in range(100)}
    sft = load_step_data(config, "sft").train
    assert all(r == f"good {p[1:]}" for p, r in zip(sft["prompt"], sft["response"]))


def test_blending_respects_weights(tmp_path, cache):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(100)])
    b = write_rows(tmp_path / "b.parquet", [{"prompt": f"b{i}"} for i in range(300)])
    specs = [DatasetSpec(str(a), weight=3.0, data_split="0,0,1"), DatasetSpec(str(b), weight=1.0, data_split="0,0,1")]
    data = load_step_data(DataConfig(datasets=specs, eval_fraction=0, blend_rows=400, cache_dir=cache), "ppo")
    prompts = data.train["prompt"]
    assert sum(p.startswith("a") for p in prompts) == 300 and sum(p.startswith("b") for p in prompts) == 100
    assert len(set(p for p in prompts if p.startswith("a"))) == 100  # upsampled: every row thrice
    assert [r.blended_rows for r in data.reports] == [300, 100]
    assert [r.data_split for r in data.reports] == ["0,0,1", "0,0,1"]
    for spec in specs:
        spec.weight = None
    plain = load_step_data(DataConfig(datasets=specs, eval_fraction=0, cache_dir=cache), "ppo").train["prompt"]
    assert sorted(plain) == sorted([f"a{i}" for i in range(100)] + [f"b{i}" for i in range(300)])
    assert blend_counts([1, 1, 1], 10) == [4, 3, 3] and sum(blend_counts([0.2, 0.5, 0.3], 7)) == 7
    specs[0].weight = 1.0
    with pytest.raises(ValueError, match="every data set a weight"):
        load_step_data(DataConfig(datasets=specs, cache_dir=cache), "ppo")


# -- tokenization -----------------------------------------------------------------------------------


def test_over_long_prompts_are_truncated_or_dropped_and_counted(tokenizer):
    rows = [{"prompt": " ".join(["dog"] * n), "response": "the dog is happy"} for n in (3, 10, 30)]
    full = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    assert [len(p) for p in full] == [6, 13, 33]  # <bos> <user> ... <assistant>
    out, stats = tokenize_sft(rows, tokenizer, TokenConfig(max_prompt_len=12, max_seq_len=40))
    assert (stats.rows, stats.kept, stats.prompts_truncated, stats.prompts_dropped) == (3, 3, 2, 0)
    for ids, prompt in zip([o["input_ids"] for o in out[1:]], full[1:]):
        assert ids[:12] == prompt[:1] + prompt[-11:]  # BOS kept, then the end of the prompt
    out, stats = tokenize_ppo(rows, tokenizer, TokenConfig(max_prompt_len=12, over_long="drop"))
    assert (stats.rows, stats.kept, stats.prompts_dropped, len(out)) == (3, 1, 2, 1)
    assert out[0]["input_ids"] == full[0]
    out, stats = tokenize_reward([{**rows[0], "chosen": "a b " * 20, "rejected": "c"}], tokenizer,
                                 TokenConfig(max_prompt_len=8, max_seq_len=16))
    assert stats.responses_truncated == 1 and len(out[0]["chosen_input_ids"]) == 16


def test_sft_labels_mask_the_prompt(tokenizer):
    rows = [{"prompt": "describe a fox", "response": "the fox is lovely"},
            {"prompt": "tell me about the weather in paris today", "response": "it was bright and warm and lovely"}]
    examples, _ = tokenize_sft(rows, tokenizer, TokenConfig())
    batch = collate_sft(examples, tokenizer.pad_token_id)
    prompt_lens = [len(p) for p in encode_prompts(tokenizer, [r["prompt"] for r in rows])]
    for i, (row, n) in enumerate(zip(rows, prompt_lens)):
        length = int(batch["attention_mask"][i].sum())
        labels, ids = batch["labels"][i].tolist(), batch["input_ids"][i].tolist()
        assert labels[:n] == [IGNORE_INDEX] * n and labels[length:] == [IGNORE_INDEX] * (len(labels) - length)
        assert labels[n:length] == ids[n:length] and ids[length - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[n:length - 1]) == row["response"]
        assert ids[length:] == [tokenizer.pad_token_id] * (len(ids) - length)


def test_reward_and_ppo_batches(tokenizer):
    rows = [{"prompt": "describe a fox", "chosen": "the fox is lovely and kind", "rejected": "the fox is sad"},
            {"prompt": "tell me about the weather in paris", "chosen": "it is warm", "rejected": "it is cold"}]
    batch = collate_reward(tokenize_reward(rows, tokenizer, TokenConfig())[0], tokenizer.pad_token_id)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["rejected_attention_mask"][0].tolist() == [1] * 11 + [0] * 3
    prompts = collate_ppo(tokenize_ppo(rows, tokenizer, TokenConfig())[0], tokenizer.pad_token_id)
    assert prompts["input_ids"].shape == (2, 10)
    assert prompts["input_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("<assistant>")] * 2
    assert prompts["attention_mask"][0].tolist() == [0] * 4 + [1] * 6
    assert prompts["input_ids"][0, :4].tolist() == [tokenizer.pad_token_id] * 4
