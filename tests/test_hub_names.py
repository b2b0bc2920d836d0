"""Model flags given as Hugging Face names (commands/hub_names.py): a model in the local Hugging Face cache trains and
scores by its name, with no network call; a name missing from the cache fails in one line under HF_HUB_OFFLINE; a
folder of that name wins."""

from __future__ import annotations

import json

import pytest
from demo_models import demo_llama, save_demo_llama, tokenizer
from huggingface_hub import constants

from hybrid_engine.commands import hub_names
from hybrid_engine.commands.main import main
from hybrid_engine.commands.model_dirs import check_model_dir, has_tokenizer, load_tokenizer
from hybrid_engine.rlhf.reward import RewardModel


def cache_entry(cache, name: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The folder Hugging Face's cache holds `name`'s snapshot in (refs/main naming the commit), created empty."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that the commands read, with the Hub offline (nothing may be downloaded)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_cached_name_is_its_snapshot(hub_cache, tmp_path, monkeypatch):
    snapshot = save_demo_llama(cache_entry(hub_cache, "org/tiny-sft"))
    monkeypatch.chdir(tmp_path)
    assert check_model_dir("org/tiny-sft") == snapshot
    assert has_tokenizer(snapshot) and load_tokenizer("org/tiny-sft").vocab == tokenizer().vocab
    (tmp_path / "org" / "tiny-sft").mkdir(parents=True)  # a folder of that name here wins over the cache
    with pytest.raises(ValueError, match=r"--model org/tiny-sft: not a saved Hugging Face model \(no config.json\)"):
        check_model_dir("org/tiny-sft")


def test_a_name_missing_from_the_cache_fails_at_once_offline(hub_cache):
    with pytest.raises(ValueError, match=r"^--reward-model org/missing: no such folder, and no snapshot of that "
                       r"Hugging Face model in the local cache .*hf-cache \(HF_HUB_OFFLINE is set"):
        check_model_dir("org/missing", "--reward-model", reward_ok=True)
    with pytest.raises(ValueError, match=r"--model no/such/dir: no such directory"):  # not a Hub name: a path
        check_model_dir("no/such/dir")


def test_online_a_missing_name_is_downloaded_or_fails_in_one_line(hub_cache, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(name, local_files_only=False):
        calls.append(local_files_only)
        if local_files_only:
            raise hub_names.LocalEntryNotFoundError("not cached")
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nmore lines")

    monkeypatch.setattr(hub_names, "snapshot_download", unreachable)
    with pytest.raises(ValueError, match=r"^--model org/tiny: no such folder, and the Hugging Face model could not be "
                       r"downloaded \(Got: ConnectError: \[Errno -2\] Name or service not known\)$"):
        check_model_dir("org/tiny")
    assert calls == [True, False] and "downloading org/tiny from the Hugging Face Hub" in capsys.readouterr().err


@pytest.mark.slow
def test_ppo_trains_on_a_policy_and_a_reward_model_given_by_name(hub_cache, tmp_path, monkeypatch):
    save_demo_llama(cache_entry(hub_cache, "org/tiny-sft"))
    RewardModel.from_model(demo_llama(seed=1)).save_pretrained(cache_entry(hub_cache, "org/tiny-rm"))
    monkeypatch.chdir(tmp_path)
    assert main(["ppo", "--model", "org/tiny-sft", "--reward-model", "org/tiny-rm", "--demo", "--output", "out",
                 "--max-steps", "1", "--batch-size", "2", "--train-batch-size", "2", "--max-new-tokens", "4",
                 "--eval-fraction", "0.01", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped"] == 0
