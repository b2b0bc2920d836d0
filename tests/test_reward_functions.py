"""Several reward functions, TRL's contract (rlhf/ppo/rewards.py): the per-function values and the weighted sum
against TRL's own GRPOTrainer._calculate_rewards and its nansum; None for "does not apply" (TRL's unscorable rows in
the GRPO and RLOO baselines, refused by PPO without a reward model); trainer_state, log_metric and log_extra; the
flags, the config file and TRL's YAML keys; the errors."""

from __future__ import annotations

import asyncio
import math

import datasets
import pytest
import torch
import transformers
from demo_models import demo_llama, tokenizer
from trl.trainer.utils import nanstd

from hybrid_engine.commands.main import build_parser
from hybrid_engine.commands.ppo import reward_functions
from hybrid_engine.commands.run_keys import split_run_keys
from hybrid_engine.rlhf import losses
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.ppo.rewards import RewardFunctions, call_functions
from hybrid_engine.rlhf.step_config import NonFiniteError


def length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def only_long(completions, **kwargs):  # applies to some completions only
    return [float(len(c.split())) if len(c) > 6 else None for c in completions]


async def answer_match(completions, answer, **kwargs):  # async, reads a column
    await asyncio.sleep(0)
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def never(completions, **kwargs):
    return [None] * len(completions)


PROMPTS = ["the cat", "a dog", "the red", "it was"]
COMPLETIONS = ["sat on the mat", "ran", "red mat and a cat", "ok"]
ANSWERS = ["mat", "ran", "blue", "no"]


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A real TRL GRPOTrainer over a tiny model, built once: its _calculate_rewards is the reference."""
    import trl

    tmp = tmp_path_factory.mktemp("trl")
    demo_llama().save_pretrained(tmp / "model")
    tok = tokenizer()
    args = trl.GRPOConfig(output_dir=str(tmp / "out"), use_cpu=True, report_to="none", max_steps=1,
                          per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.0,
                          reward_weights=[1.0, -0.5, 2.0, 3.0], save_strategy="no", dataloader_num_workers=0)
    return trl.GRPOTrainer(model=str(tmp / "model"), reward_funcs=[length, only_long, answer_match, never], args=args,
                           processing_class=tok, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))


def test_the_values_and_the_weighted_sum_are_trls(trl_trainer):
    inputs = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS)]
    ids = [[5, 6, 1], [7, 1], [8, 9, 10, 1], [11]]
    theirs = trl_trainer._calculate_rewards(inputs, PROMPTS, COMPLETIONS, ids)  # (4, 4), NaN for None
    funcs = RewardFunctions.load([length, only_long, answer_match, never], [1.0, -0.5, 2.0, 3.0])
    ours = call_functions(funcs, PROMPTS, COMPLETIONS, {"answer": ANSWERS}, ids)
    torch.testing.assert_close(ours.values.float(), theirs, equal_nan=True, rtol=0, atol=0)
    assert ours.applies.tolist() == (~theirs.isnan()).tolist()
    trl_sum = (theirs * trl_trainer.reward_weights.unsqueeze(0)).nansum(dim=1)  # TRL's aggregation (sum, then
    trl_sum[theirs.isnan().all(dim=1)] = math.nan  # normalize): rows no function scored are unscorable
    torch.testing.assert_close(ours.combined.float(), trl_sum, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert ours.means() == pytest.approx({"length": sum(map(len, COMPLETIONS)) / 4, "only_long": (4 + 5) / 2,
                                          "answer_match": 0.5, "never": math.nan}, nan_ok=True)
    assert funcs.names == tuple(trl_trainer.reward_func_names)


def test_every_function_unscorable_is_nan_and_not_scorable():
    ours = call_functions(RewardFunctions.load([never, only_long]), PROMPTS, COMPLETIONS, {})
    assert ours.scorable.tolist() == [True, False, True, False]
    assert ours.combined[1].isnan() and ours.combined[0] == 4.0


def trl_grpo(scores: torch.Tensor, k: int) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer's advantages (sum_then_normalize, scale_rewards="group"), as its source computes them."""
    grouped = scores.view(-1, k)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(k)
    std = nanstd(grouped, dim=1).repeat_interleave(k)
    return torch.nan_to_num((scores - mean) / (std + 1e-4), nan=0.0)


def trl_rloo(scores: torch.Tensor, k: int) -> torch.Tensor:
    """TRL 1.16 RLOOTrainer's leave-one-out advantages over the scorable siblings, as its source computes them."""
    grouped = scores.view(-1, k)
    count = (~grouped.isnan()).sum(dim=1, keepdim=True)
    baseline = ((grouped.nansum(dim=1, keepdim=True) - grouped) / (count - 1)).view(-1)
    return torch.nan_to_num(scores - baseline, nan=0.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_unscorable_samples_leave_the_group_baselines_as_in_trl(k):
    g = torch.Generator().manual_seed(k)
    for trial in range(20):
        scores = torch.randn(6 * k, generator=g, dtype=torch.float64)
        scores[torch.rand(6 * k, generator=g) < 0.35] = math.nan  # groups with 0, 1 or more scorable samples
        # 1e-7: TRL's nanstd takes its n / (n - 1) from integer counts, in fp32 (the default dtype), even for fp64
        torch.testing.assert_close(losses.grpo_advantages(scores, k), trl_grpo(scores, k), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(losses.rloo_advantages(scores, k), trl_rloo(scores, k), rtol=1e-12, atol=1e-12)
    finite = torch.randn(4 * k, generator=g, dtype=torch.float64)  # no NaN: the finite path, bit for bit unchanged
    grouped = finite.view(-1, k)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.equal(losses.grpo_advantages(finite, k), expected)


# -- through train_ppo ---------------------------------------------------------------------------------------------


def prompts_data(n_train=4, n_eval=2) -> StepData:
    words = ["the cat sat", "a dog ran", "the red mat", "it was big", "a blue cat", "the dog sat"]
    rows = [{"prompt": w, "answer": w.split()[-1]} for w in words]
    return StepData(train=datasets.Dataset.from_list(rows[:n_train]),
                    eval=datasets.Dataset.from_list(rows[n_train:n_train + n_eval]), reports=[])


def grpo(**overrides) -> PPOConfig:
    settings = dict(algo="grpo", max_steps=2, batch_size=2, train_batch_size=4, num_generations=2, max_new_tokens=4,
                    lr=1e-3, log_samples=2)
    return PPOConfig(**{**settings, **overrides})


def test_several_weighted_functions_train_and_are_logged_each():
    records = []
    half_none = lambda completions, **kw: [1.0 if i % 2 else None for i in range(len(completions))]  # noqa: E731
    result = train_ppo(ModelSources(actor=demo_llama(), reward_fn=[length, half_none]), tokenizer(), prompts_data(),
                       grpo(reward_weights=[0.5, 2.0]), progress=False, log=lambda step, r: records.append(r))
    first = result.history[0]
    assert set(first) >= {"fn_score", "fn_score/length", "fn_score/<lambda>", "unscorable"}
    assert first["unscorable"] == 0 and first["skipped"] == 0
    for i, sample in enumerate(first["samples"]):  # each logged sample's score: the weighted sum of what applied
        assert sample["score"] == pytest.approx(0.5 * len(sample["completion"]) + (2.0 if i % 2 else 0.0))
    assert first["fn_score"] == pytest.approx(0.5 * first["fn_score/length"] + 2.0 * 0.5 * first["fn_score/<lambda>"])
    evals = [r for r in records if r.get("eval")]
    assert {"eval_reward_fn", "eval_reward_fn/length", "eval_reward_fn/<lambda>"} <= set(evals[0])
    assert result.after.reward_fns.keys() == {"length", "<lambda>"}


def test_rows_no_function_applies_to_train_grpo_but_stop_ppo_without_a_reward_model():
    def odd_only(completions, **kwargs):
        return [float(len(c)) if i % 2 else None for i, c in enumerate(completions)]

    with pytest.warns(RuntimeWarning, match=r"no reward function applies to completion 0 \(prompt '.+'\): each "
                      r"returned None: such completions get advantage 0 and stay out of their group's baseline"):
        result = train_ppo(ModelSources(actor=demo_llama(), reward_fn=[odd_only, never]), tokenizer(),
                           prompts_data(), grpo(), progress=False)
    for record in result.history:  # unscorable samples get advantage 0 and the step trains
        assert record["skipped"] == 0 and math.isfinite(record["policy_loss"]) and record["unscorable"] == 2
        assert record["score"] == pytest.approx(record["fn_score/odd_only"])  # the mean over the scorable ones
        assert math.isnan(record["fn_score/never"]) and math.isnan(record["samples"][0]["score"])
    ppo = PPOConfig(max_steps=1, batch_size=2, train_batch_size=2, max_new_tokens=4, lr=1e-3, nonfinite="stop")
    with pytest.raises(NonFiniteError, match=r"no reward function applies to completion 0 \(prompt '.+'\): each "
                       r"returned None, and PPO has no reward model to score it"):
        train_ppo(ModelSources(actor=demo_llama(), critic=demo_llama(), reward_fn=never), tokenizer(),
                  prompts_data(), ppo, progress=False)


def test_trainer_state_log_metric_and_log_extra_reach_the_functions_as_in_trl():
    states, data = [], prompts_data()

    def curriculum(completions, trainer_state, log_metric, log_extra, **kwargs):
        assert isinstance(trainer_state, transformers.TrainerState)
        states.append((trainer_state.global_step, trainer_state.max_steps))
        log_metric("mean_chars", sum(map(len, completions)) / len(completions))
        log_extra("chars", [len(c) for c in completions])
        return [0.1 * trainer_state.global_step + len(c) for c in completions]

    result = train_ppo(ModelSources(actor=demo_llama(), reward_fn=curriculum), tokenizer(), data,
                       grpo(max_steps=3, batch_size=1, train_batch_size=2), progress=False)
    # the evaluation before training, steps 0, 1, 2 (global_step: the steps done before), the evaluation after
    assert states == [(0, 3), (0, 3), (1, 3), (2, 3), (3, 3)]
    for record in result.history:
        chars = [len(s["completion"]) for s in record["samples"]]
        assert [s["chars"] for s in record["samples"]] == chars
        assert record["mean_chars"] == pytest.approx(sum(chars) / len(chars))

    def clashing(completions, log_metric, **kwargs):
        log_metric("kl", 1.0)
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"logged the metric 'kl' with log_metric, a name the step's own record uses"):
        train_ppo(ModelSources(actor=demo_llama(), reward_fn=clashing), tokenizer(), data, grpo(), progress=False)


# -- flags, config files, errors -------------------------------------------------------------------------------------


def test_flags_and_config_keys_take_several_functions_and_their_weights(tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text("def a(completions, **kw):\n    return [1.0] * len(completions)\n\n"
                     "def b(completions, **kw):\n    return [None] * len(completions)\n")
    args = build_parser().parse_args(["ppo", "--reward-fn", f"{rules}:a", "--reward_funcs", f"{rules}:b",
                                      "--reward-weights", "1", "0.25"])
    assert args.reward_fn == [f"{rules}:a", f"{rules}:b"] and args.reward_weights == (1.0, 0.25)
    trl_yaml = {"reward_funcs": [f"{rules}:a", f"{rules}:b"], "reward_weights": [2, 1], "beta": 0.0}
    rest, run = split_run_keys(trl_yaml, ["reward_fn"])
    assert run == {"reward_fn": [f"{rules}:a", f"{rules}:b"]} and dict(rest) == {"reward_weights": [2, 1], "beta": 0.0}
    config = PPOConfig(reward_weights=[2, 1])
    assert [f.__name__ for f in reward_functions(run["reward_fn"], config)] == ["a", "b"]


@pytest.mark.parametrize("specs, weights, match", [
    (["hybrid_engine.rlhf.demo:rule_score_batch"], [1.0, 2.0], r"reward_weights gives 2 weights for 1 reward "
                                                              r"functions \(rule_score_batch\)"),
    (None, [1.0], r"--reward-weights 1.0: there is no --reward-fn to weight"),
])
def test_weights_that_do_not_match_the_functions_are_refused(specs, weights, match):
    with pytest.raises(ValueError, match=match):
        reward_functions(specs, PPOConfig(reward_weights=weights))


@pytest.mark.parametrize("weights", [["a"], [], [math.inf], "1,2"])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match=r"reward_weights must be a list of finite numbers"):
        PPOConfig(reward_weights=weights)


def test_repeated_names_are_numbered():
    funcs = RewardFunctions.load([length, length, only_long])
    assert funcs.names == ("length", "length_2", "only_long") and funcs.weights == (1.0, 1.0, 1.0)
