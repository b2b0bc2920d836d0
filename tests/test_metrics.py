"""A run's metrics (commands/metrics.py): metrics.jsonl holds every record as written, numbers and the rest alike;
TensorBoard gets the numbers as scalars and a PPO step's sample rollouts as text; the plot reads the numbers only.
SFT's and the reward model's per-step records (log_losses) hold the loss and the learning rate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from hybrid_engine.commands.metrics import MetricsLog, log_losses, plot_curves, read_metrics
from hybrid_engine.commands.trackers import samples_text

SAMPLES = [{"prompt": "describe a fox\nbriefly", "completion": "a quick *red* fox", "score": 0.25},
           {"prompt": "tell me about paris", "completion": "", "score": -1.5}]
RECORDS = [(1, {"score": 0.5, "kl": 1.25, "lr": 1e-3, "response_len_max": 8, "logprob_source": "generation",
                "samples": SAMPLES}),
           (2, {"score": 0.75, "kl": math.inf, "lr": 5e-4, "response_len_max": 6, "logprob_source": "generation",
                "samples": SAMPLES[:1]}),
           (2, {"eval": True, "rule": 0.5, "eval_kl": 0.1})]


def write(directory, records=RECORDS) -> None:
    log = MetricsLog(directory, "ppo")
    for step, record in records:
        log.write(step, record)
    log.close()


def test_the_jsonl_holds_every_record_as_written_and_the_plot_reads_it(tmp_path):
    write(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"tag": "ppo", "step": step, **record} for step, record in RECORDS]
    pytest.importorskip("matplotlib")
    assert plot_curves(records, tmp_path / "ppo.png", "test")  # the strings and lists beside the numbers are skipped
    assert (tmp_path / "ppo.png").read_bytes()[:4] == b"\x89PNG"


def test_the_samples_are_text_in_tensorboard_and_the_numbers_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["ppo/eval_kl", "ppo/kl", "ppo/lr", "ppo/response_len_max",
                                               "ppo/rule", "ppo/score"]
    assert [(e.step, e.value) for e in events.Scalars("ppo/kl")] == [(1, 1.25)]  # inf is left out
    assert [(e.step, e.value) for e in events.Scalars("ppo/response_len_max")] == [(1, 8), (2, 6)]
    assert events.Tags()["tensors"] == ["ppo/samples/text_summary"]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("ppo/samples/text_summary")}
    assert texts == {1: samples_text(SAMPLES), 2: samples_text(SAMPLES[:1])}


def test_samples_text_shows_each_prompt_and_completion_verbatim():
    text = samples_text(SAMPLES)
    blocks = text.split("**2.**")
    assert blocks[0].startswith("**1.** score 0.25, prompt:") and blocks[1].startswith(" score -1.5, prompt:")
    assert "    describe a fox\n    briefly" in blocks[0] and "    a quick *red* fox" in blocks[0]  # code blocks
    assert "    tell me about paris" in blocks[1] and blocks[1].endswith("completion:\n\n    (empty)")


def test_a_conversational_prompt_shows_one_line_a_message():
    sample = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a fox?"}],
              "completion": "quick", "score": 1.0}
    assert "    system: be brief\n    user: a fox?\n\ncompletion:\n\n    quick" in samples_text([sample])


def test_sft_and_reward_records_hold_the_loss_and_the_learning_rate(tmp_path):
    result = SimpleNamespace(losses=[2.5, math.nan, 1.5], lrs=[1e-3, 2e-3 / 3, 1e-3 / 3])
    log_losses(str(tmp_path), "sft", result)
    assert read_metrics(tmp_path / "metrics.jsonl")[1:] == [
        {"tag": "sft", "step": 2, "loss": pytest.approx(math.nan, nan_ok=True), "lr": 2e-3 / 3},
        {"tag": "sft", "step": 3, "loss": 1.5, "lr": 1e-3 / 3}]
