"""Gradient accumulation (rlhf/accumulate.py): N micro-batches of b rows train as one batch of N * b rows, for SFT,
the reward model, PPO and GRPO in plain torch (fp32: losses within rel 1e-5, weights within rtol 1e-5 / atol 1e-6;
ZeRO 2 and 3 on 2 ranks: tests/test_rlhf_distributed.py), the token weighting that makes it so, skipped updates
and bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from demo_models import demo_llama, demo_rows, tokenizer
from test_ppo import config as ppo_config
from test_ppo import demo_actor
from test_ppo import run as run_ppo
from test_trl_names import config_file, parsed

from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.main import build_parser
from hybrid_engine.commands.train import step_configs
from hybrid_engine.engine.training import PlainTrainer
from hybrid_engine.rlhf import RewardConfig, SFTConfig, reward, sft, train_reward, train_sft
from hybrid_engine.rlhf.accumulate import accumulated_step, micro_batches
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.ppo import models as ppo_models
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.sft import response_tokens, sft_loss
from hybrid_engine.rlhf.tokens import TokenConfig, collate_sft, tokenize_sft
from hybrid_engine.rlhf.trainer import training_ds_config

RTOL, ATOL = 1e-5, 1e-6


def sgd(params, lr: float, weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr)


@pytest.fixture
def plain_sgd(monkeypatch):
    """The trainers step with plain SGD instead of AdamW: its update is linear in the gradient, so the weights
    compare at fp32 tolerance. AdamW's first steps are lr * g / (|g| + eps) per element: it turns the rounding noise of
    elements whose gradient is near 0 into differences of up to lr (measured: 6e-6 after 3 SFT steps at lr 1e-2,
    6e-7 at 1e-3), whatever the accumulation."""
    for module in (sft, reward, ppo_models):
        monkeypatch.setattr(module, "adamw", sgd)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = dict(b.named_parameters())
    assert pairs.keys() == dict(a.named_parameters()).keys()
    for name, p in a.named_parameters():
        diff = (p - pairs[name]).abs().max().item()
        torch.testing.assert_close(p, pairs[name], rtol=RTOL, atol=ATOL, msg=f"{name}: max |diff| {diff:.3g}")


def test_micro_batches_cut_rows_in_order():
    assert micro_batches([5, 1, 4, 2, 3, 0], 3) == [[5, 1], [4, 2], [3, 0]]
    assert micro_batches(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert micro_batches([7], 4) == [[7]]  # a short last batch: no empty micro-batch


def linear_losses(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module, rows: list[list[int]]):
    return [lambda r=r: ((model(x[r]) - y[r]) ** 2).mean() for r in rows]


def test_a_micro_batchs_loss_is_scaled_by_its_share_of_the_count():
    """Micro-batches of 1 and 3 rows: the sum of the scaled means is the mean over all 4 rows, and so is the update
    (the mean of the two means would weigh the lone row 3 times too much)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    big, small = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    small.load_state_dict(big.state_dict())
    one, two = PlainTrainer(big, torch.optim.SGD(big.parameters(), lr=0.1)), \
        PlainTrainer(small, torch.optim.SGD(small.parameters(), lr=0.1))
    whole = accumulated_step(one, big, linear_losses(x, y, big, [[0, 1, 2, 3]]), [4], 1, None)
    parts = accumulated_step(two, small, linear_losses(x, y, small, [[0], [1, 2, 3]]), [1, 3], 2, None)
    assert parts == pytest.approx(whole, rel=RTOL)
    assert_same_weights(big, small)


def test_a_nan_in_a_later_micro_batch_skips_the_whole_update():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    y[3] = float("nan")
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PlainTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    loss = accumulated_step(trainer, model, linear_losses(x, y, model, [[0, 1], [2, 3]]), [2, 2], 2, None)
    assert loss != loss  # NaN
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # the first micro-batch's gradients are dropped


@pytest.fixture(scope="module")
def sft_rows(cache):
    return demo_rows("sft", 48, 8, cache)


def test_sft_micro_batches_hold_different_token_counts(sft_rows):
    """What makes the weighting matter: the micro-batches' token counts differ, so the mean of their means is not
    the batch's mean (by more than 10 times the tolerance of the tests below)."""
    model = demo_llama()
    examples, _ = tokenize_sft(sft_rows.train.select(range(8)), tokenizer(), TokenConfig())
    parts = [collate_sft(examples[i:i + 2], tokenizer().pad_token_id) for i in range(0, 8, 2)]
    counts = [response_tokens(p) for p in parts]
    assert len(set(counts)) > 1
    with torch.no_grad():
        means = [float(sft_loss(model, p)) for p in parts]
        whole = float(sft_loss(model, collate_sft(examples, tokenizer().pad_token_id)))
    assert sum(m * c for m, c in zip(means, counts)) / sum(counts) == pytest.approx(whole, rel=RTOL)
    assert abs(sum(means) / len(means) - whole) > 10 * RTOL * whole  # a random model: per-token losses are close


def test_sft_with_accumulation_equals_the_large_batch(sft_rows, plain_sgd):
    def run(accumulation: int):
        config = SFTConfig(max_steps=2, batch_size=8, lr=1.0, gradient_accumulation_steps=accumulation)
        return train_sft(demo_llama(), tokenizer(), sft_rows, config, progress=False)

    big, small = run(1), run(4)
    assert big.losses[-1] < big.losses[0] - 0.05  # it trained
    assert small.losses == pytest.approx(big.losses, rel=RTOL)
    assert small.eval_perplexity_after == pytest.approx(big.eval_perplexity_after, rel=RTOL)
    assert small.train_tokens == big.train_tokens and small.lrs == big.lrs
    assert_same_weights(big.engine.module, small.engine.module)


def test_reward_with_accumulation_equals_the_large_batch(cache, plain_sgd):
    pairs = demo_rows("reward", 24, 4, cache)

    def run(accumulation: int) -> RewardModel:
        config = RewardConfig(max_steps=2, batch_size=8, lr=1.0, gradient_accumulation_steps=accumulation)
        return train_reward(demo_llama(), tokenizer(), pairs, config, progress=False)

    big, small = run(1), run(2)
    assert len(set(big.losses)) == 2  # it trained
    assert small.losses == pytest.approx(big.losses, rel=RTOL)
    assert_same_weights(big.model, small.model)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_and_grpo_with_accumulation_equal_the_large_batch(cache, algo, plain_sgd):
    """Two rollouts of 8 sequences (4 prompts; GRPO 2 samples each), one minibatch of 8 a rollout, in 1 or 4
    micro-batches: the same losses, figures and weights (actor and critic)."""
    data, rm = demo_rows("ppo", 16, 2, cache), RewardModel.from_model(demo_llama(seed=1)).eval()

    def run(accumulation: int):
        cfg = ppo_config(algo, max_steps=2, train_batch_size=8, num_generations=2, lr=1.0, critic_lr=1.0,
                         gradient_accumulation_steps=accumulation)
        actor = demo_actor()
        return actor, run_ppo(data, cfg, rm, actor=actor)

    (big_actor, big), (small_actor, small) = run(1), run(4)
    for a, b in zip(big.history, small.history):
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac", "score"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), key
    assert not all(torch.equal(p, q) for p, q in zip(big_actor.parameters(), demo_actor().parameters()))  # trained
    assert_same_weights(big_actor, small_actor)


@pytest.mark.parametrize("config, match", [
    (lambda: SFTConfig(batch_size=8, gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive"),
    (lambda: SFTConfig(batch_size=8, gradient_accumulation_steps=3), "gradient_accumulation_steps 3 must divide "
                                                                     "batch_size 8"),
    (lambda: RewardConfig(batch_size=6, gradient_accumulation_steps=4), "must divide batch_size 6"),
    (lambda: PPOConfig(train_batch_size=6, gradient_accumulation_steps=4), "must divide train_batch_size 6"),
])
def test_bad_accumulation_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        config()


def test_deepspeed_gets_the_micro_batch_and_the_accumulation():
    ds = training_ds_config({"zero_optimization": {"stage": 2}}, 8, 1.0, accumulation=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match="gradient_accumulation_steps.*is 1 but the config says 4"):
        training_ds_config({"gradient_accumulation_steps": 1}, 8, 1.0, accumulation=4)


def test_the_commands_take_the_accumulation_of_the_deepspeed_config_unless_given(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}))
    taken = step_config(parsed("sft", "--ds-config", str(ds), "--batch-size", "8"), SFTConfig, "sft")
    assert taken.gradient_accumulation_steps == 2
    given = step_config(parsed("sft", "--ds-config", str(ds), "--gradient-accumulation-steps", "4"), SFTConfig, "sft")
    assert given.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match=r"ds_config\['gradient_accumulation_steps'\] is 2 but the config says 4"):
        training_ds_config(str(ds), given.batch_size, given.max_grad_norm, accumulation=4)


def test_a_trl_yaml_with_accumulation_counts_trls_micro_batches(tmp_path):
    path = config_file(tmp_path, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                  "num_generations": 2, "ppo": {"algo": "grpo"}})
    config = step_config(parsed("ppo", "--config", path), PPOConfig, "ppo")
    assert (config.train_batch_size, config.gradient_accumulation_steps) == (8, 2)


def test_train_passes_the_accumulation_to_every_step_unless_a_step_sets_its_own():
    args = build_parser().parse_args(["train", "--gradient-accumulation-steps", "2",
                                      "--set", "reward.gradient_accumulation_steps=4"])
    configs = step_configs(args)
    assert {step: c.gradient_accumulation_steps for step, c in configs.items()} == {"sft": 2, "reward": 4, "ppo": 2}
