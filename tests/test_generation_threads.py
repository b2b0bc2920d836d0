"""generate()'s threads setting (generation/threads.py): the policy as a function of (cores, torch's count, other
runnable threads), the load readings, and generation unchanged by it, with torch's thread count restored."""

import logging

import pytest
import torch

import hybrid_engine
from hybrid_engine.commands.env import generation_threads_row
from hybrid_engine.generation import threads
from hybrid_engine.model.presets import preset_model


@pytest.mark.parametrize("cores, requested, others, expected", [
    (2, 2, 0, 2),    # a quiet machine: torch's count
    (2, 2, 1, 1),    # one busy thread elsewhere on 2 cores: the free core
    (2, 2, 2, 1),    # every core busy: still one thread
    (2, 2, 9, 1),    # oversubscribed: never fewer than 1
    (16, 8, 4, 8),   # enough free cores: never more than torch's count
    (16, 16, 5, 11),
    (4, 1, 0, 1),    # a user who set 1 thread keeps 1
])
def test_threads_for(cores, requested, others, expected):
    assert threads.threads_for(cores, requested, others) == expected


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("torch", "torch"), (3, 3), ("4", 4)])
def test_parse_threads(value, expected):
    assert threads.parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_a_bad_threads_setting_is_a_clear_error(value):
    with pytest.raises(ValueError, match="threads must be 'auto', 'torch' or a thread count >= 1"):
        threads.parse_threads(value)


def test_the_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.parse_threads(None) == "torch"
    monkeypatch.setenv(threads.ENV, "0")
    with pytest.raises(ValueError, match=threads.ENV):
        threads.parse_threads(None)
    monkeypatch.delenv(threads.ENV)
    assert threads.parse_threads(None) == "auto"


def test_running_total_reads_procs_running(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nctxt 99\nprocs_running 5\nprocs_blocked 0\n")
    assert threads.running_total(stat) == 5
    assert threads.running_total(tmp_path / "missing") is None


def test_running_here_counts_this_process_threads_in_state_r(tmp_path):
    for tid, state in (("1", "R"), ("2", "S"), ("3", "R")):
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "stat").write_text(f"{tid} (a (b) c) {state} 1 1 1\n")  # the name may hold ") "
    assert threads.running_here(tmp_path) == 2


def test_auto_takes_the_fewest_other_threads_of_its_samples(monkeypatch):
    totals = iter([7, 3, 5])
    monkeypatch.setattr(threads, "running_total", lambda: next(totals))
    monkeypatch.setattr(threads, "running_here", lambda: 2)
    assert threads.others_running() == 1


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def busy(monkeypatch, others: int) -> None:
    monkeypatch.setattr(threads, "others_running", lambda: others)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)


def test_auto_runs_on_the_free_cores_and_restores_torch_count(monkeypatch, two_threads, caplog):
    busy(monkeypatch, 1)
    threads._last_logged["choice"] = None
    with caplog.at_level(logging.INFO, logger=threads.__name__):
        with threads.generation_threads("auto") as n:
            assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert "1 runnable threads of other processes on 2 cores" in caplog.text


def test_torch_count_is_restored_after_an_error_inside(monkeypatch, two_threads):
    busy(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="inside"):
        with threads.generation_threads("auto"):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_a_bad_setting_is_refused_before_any_work(two_threads):
    model = preset_model("llama-tiny")
    with pytest.raises(ValueError, match="threads must be"):
        hybrid_engine.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, threads=0)
    assert torch.get_num_threads() == 2


def test_generation_is_the_same_on_one_thread_as_on_two(monkeypatch, two_threads):
    """fp32 greedy and sampled: tokens and log-probs bit-equal with the policy choosing 1 thread and with it off
    (torch's 2); the call leaves torch's count as it found it."""
    model = preset_model("llama-20m")  # a 32000-token head and 384-wide layers: ops big enough to split
    ids = torch.randint(3, 32000, (4, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, eos_token_id=None, do_sample=True, top_k=50, seed=3)
    off = hybrid_engine.generate(model, ids, threads="torch", **kw)
    busy(monkeypatch, 1)
    on = hybrid_engine.generate(model, ids, **kw)
    assert torch.get_num_threads() == 2
    assert torch.equal(on.sequences, off.sequences)
    assert torch.equal(on.logprobs, off.logprobs)


def test_env_says_what_the_setting_does(monkeypatch):
    busy(monkeypatch, 1)
    monkeypatch.delenv(threads.ENV, raising=False)
    assert generation_threads_row().startswith("'auto' (default 'auto'): each generate() call runs on torch's")
    assert "now 1 (threads='auto': 1 runnable threads of other processes on 2 cores" in generation_threads_row()
    monkeypatch.setenv(threads.ENV, "3")
    assert generation_threads_row() == f"3 ({threads.ENV}=3): every generate() call runs on 3 threads"


def test_a_quiet_reading_ends_the_sampling(monkeypatch):
    totals = iter([1])  # a second reading would raise StopIteration
    monkeypatch.setattr(threads, "running_total", lambda: next(totals))
    monkeypatch.setattr(threads, "running_here", lambda: 1)
    assert threads.others_running() == 0
