"""RLHF step 3 (rlhf/ppo/: the driver, the experience phases) on tiny demo Llamas in one process: the experience of a
rollout against references computed here (log-probs, scores, PPO and group targets), the trainer end to end for
ppo, grpo and rloo, determinism, reward functions, NaN handling, the EMA, saving, PTX, LoRA and bad settings.
The formulas themselves are tested in test_losses.py; these tests check what the trainer feeds them."""

from __future__ import annotations

import copy
import dataclasses
import math

import datasets
import peft
import pytest
import torch
import transformers
from demo_models import demo_llama, demo_mixtral, demo_rows, tokenizer

from hybrid_engine.engine.logprobs import positions
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.generation import generate
from hybrid_engine.rlhf import RewardModel, losses
from hybrid_engine.rlhf.checkpoint import config_json
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.demo import rule_score_batch
from hybrid_engine.rlhf.ppo import ModelSources, NonFiniteError, PPOConfig, PPOResult, build_models, driver, train_ppo
from hybrid_engine.rlhf.ppo import batch as xp
from hybrid_engine.rlhf.ppo import experience as phases
from hybrid_engine.rlhf.ppo import update as ppo_update
from hybrid_engine.rlhf.ppo.config import saved_config
from hybrid_engine.rlhf.ppo.experience import ON_POLICY, Prompts
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.scoring import FrozenPolicy
from hybrid_engine.rlhf.tokens import collate_ppo, encode_prompts

ATOL = 1e-5


@pytest.fixture(scope="module")
def data(cache) -> StepData:
    return demo_rows("ppo", 16, 6, cache)


@pytest.fixture(scope="module")
def rm() -> RewardModel:
    """A random reward model on a second tiny Llama (train_ppo copies it: the fixture never changes)."""
    torch.manual_seed(11)
    return RewardModel.from_model(demo_llama(seed=1)).eval()


@pytest.fixture
def captured(monkeypatch) -> list:
    """The Models each train_ppo call builds (its frozen reference and reward model are not in PPOResult)."""
    built = []
    real = driver.build_models

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(driver, "build_models", capture)
    return built


def demo_actor(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny demo Llama whose EOS row of the LM head points along its mean hidden state, so that a good share of
    8-token responses end early: the rollouts then have responses of different lengths, padded on the right."""
    model = demo_llama(seed)
    tok = tokenizer()
    prompts = ["describe the weather in paris today", "tell me about a fox", "i want you to describe a turtle"]
    with torch.no_grad():
        hidden = [model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                  for ids in encode_prompts(tok, prompts)]
        mean = torch.cat(hidden).mean(0)
        model.lm_head.weight[tok.eos_token_id] = 7 * mean / mean.norm() ** 2
    return model


def config(algo: str = "ppo", **fields) -> PPOConfig:
    """The tests' small config: 4 prompts a step, 8 new tokens, 2 samples a prompt for grpo and rloo."""
    base = dict(algo=algo, max_steps=3, batch_size=4, train_batch_size=4, max_new_tokens=8, lr=1e-3, critic_lr=1e-3,
                num_generations=None if algo == "ppo" else 2, eval_batch_size=8)
    return PPOConfig(**{**base, **fields})


SOURCE_FIELDS = ("critic", "reference", "reward_fn", "eval_fn", "ds_config", "lora")


def run(data, cfg: PPOConfig, rm=None, actor=None, **kwargs) -> PPOResult:
    """train_ppo on the demo actor (or `actor`) and `rm`; kwargs are ModelSources fields or train_ppo options."""
    sources = ModelSources(actor=actor if actor is not None else demo_actor(), reward_model=rm,
                           **{k: kwargs.pop(k) for k in SOURCE_FIELDS if k in kwargs})
    return train_ppo(sources, tokenizer(), data, cfg, progress=False, **kwargs)


def make_experience(models, prompts: Prompts, indices: list[int], cfg: PPOConfig, kl_coef: float):
    """Phases 1-3 of a step, as driver.ppo_step runs them: (the experience, the figures of phase 2)."""
    ro = phases.generate(models, prompts, indices, tokenizer(), cfg)
    exp, figures = phases.score(models, ro, prompts, indices, tokenizer(), cfg)
    return phases.targets(models, exp, cfg, kl_coef), figures


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot_after_each_step(model: torch.nn.Module, snapshots: list):
    """A train_ppo log callback that appends the model's weights to `snapshots` after every training step."""

    def log(step: int, record: dict) -> None:
        if not record.get("eval"):
            snapshots.append(weights(model))

    return log


@torch.no_grad()
def hf_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, start: int, temperature: float) -> torch.Tensor:
    """fp64 [B, T - start]: the HF model's log_softmax(logits / temperature) of each response token, 0 off the
    mask."""
    ref = copy.deepcopy(model).double().eval()
    logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    picked = (logits / temperature).log_softmax(-1)[:, start - 1 : -1].gather(-1, ids[:, start:, None]).squeeze(-1)
    return torch.where(mask[:, start:].bool(), picked, 0)


def experience(data, rm, algo: str, reward_fn=None, **fields):
    """One make_experience batch of 4 prompts after the actor was moved off the reference (so old and reference
    log-probs differ); with the models, the untouched SFT copy and the prompts."""
    cfg = config(algo, **fields)
    sft = demo_actor()
    pristine = copy.deepcopy(sft)
    models = build_models(ModelSources(actor=sft, reward_model=rm, reward_fn=reward_fn), cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in models.actor.module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    prompts = Prompts.of(data.train, tokenizer(), cfg)
    exp, figures = make_experience(models, prompts, [0, 1, 2, 3], cfg, cfg.kl_coef)
    return exp, figures, models, pristine, cfg


# -- phases 1-3: one rollout's experience ------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_experience_shapes(data, rm, algo):
    exp, figures, _, _, cfg = experience(data, rm, algo)
    B = 4 * cfg.num_generations
    P, R = exp.start, exp.mask.shape[1]
    assert exp.sequences.shape == exp.attention_mask.shape == (B, P + R) and 1 <= R <= cfg.max_new_tokens
    for name in ("mask", "old_logprobs", "ref_logprobs", "advantages"):
        assert getattr(exp, name).shape == (B, R), name
    assert exp.scores.shape == (B,) and len(exp.completions) == B
    assert torch.equal(exp.attention_mask[:, P:].float(), exp.mask)
    lengths = exp.mask.sum(1)
    assert (lengths >= 1).all() and lengths.min() < R  # some responses ended early, padded on the right
    assert (exp.sequences[:, P:][exp.mask == 0] == tokenizer().pad_token_id).all()
    if algo == "ppo":
        assert exp.old_values.shape == exp.returns.shape == exp.rewards.shape == (B, R)
    else:
        assert exp.old_values is None and exp.returns is None and exp.rewards is None
    assert figures["logprob_source"] == "generation" and figures["response_len"] == float(exp.mask.sum(1).mean())


@pytest.mark.parametrize("algo, log_samples", [("grpo", 3), ("ppo", 0)])
def test_the_response_figures_and_samples_of_a_rollout(data, rm, algo, log_samples):
    exp, figures, _, _, cfg = experience(data, rm, algo, log_samples=log_samples)
    eos, lengths, cut = tokenizer().eos_token_id, [], []
    for row, mask in zip(exp.sequences[:, exp.start:].tolist(), exp.mask.tolist()):  # each response, token by token
        tokens = [t for t, m in zip(row, mask) if m]
        lengths.append(len(tokens))
        cut.append(len(tokens) == cfg.max_new_tokens and tokens[-1] != eos)
    assert figures["response_len_max"] == max(lengths) and figures["truncated_frac"] == sum(cut) / len(cut)
    assert 0 < sum(cut) < len(cut) or algo == "ppo"  # the demo actor ends some of its 8 responses, not all
    prompts = [data.train[i // cfg.num_generations]["prompt"] for i in range(log_samples)]
    expected = [{"prompt": p, "completion": c, "score": float(s)}
                for p, c, s in zip(prompts, exp.completions, exp.scores)]
    assert figures.get("samples", []) == expected and ("samples" in figures) == (log_samples > 0)


def test_truncated_responses_are_those_without_an_eos():
    eos = 2  # also the padding here, as with tokenizers whose pad is their EOS
    sequences = torch.tensor([[9, 9, 5, 6, 7, 8],  # 4 tokens, max_new_tokens, no EOS: cut off
                              [0, 9, 5, 2, 2, 2],  # ended at its second token
                              [9, 9, 5, 6, 7, 2],  # ended at the last token it could have
                              [0, 9, 2, 2, 2, 2]])  # an EOS alone
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert xp.truncated(sequences, mask, 2, eos).tolist() == [True, False, False, False]


@torch.no_grad()
def hf_policy(model, exp: xp.Experience, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (log-probs [B, R] of the response tokens, entropy [B, R]) of the HF model's temperature-scaled
    distribution, from its full logits."""
    ref = copy.deepcopy(model).double().eval()
    mask = exp.attention_mask
    logits = ref(input_ids=exp.sequences, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    dist = torch.distributions.Categorical(logits=logits[:, exp.start - 1 : -1] / temperature)
    return dist.log_prob(exp.sequences[:, exp.start:]), dist.entropy()


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_an_actor_updates_figures_are_its_policys_entropy_kl_and_clipping(data, rm, algo):
    exp, _, models, _, cfg = experience(data, rm, algo, temperature=0.7)
    logprobs, entropy = hf_policy(models.actor.module, exp, cfg.temperature)  # the policy before the update
    delta = 0.5 * (torch.arange(exp.mask.numel()).view_as(exp.mask) % 3 - 1)  # log-ratios of 0, +-0.5: clipped or not
    exp = dataclasses.replace(exp, old_logprobs=(logprobs + delta).float())
    loss, figures = ppo_update.actor_update(models, exp, cfg, cfg.kl_coef)
    m = exp.mask.bool()
    d, adv = (logprobs - exp.old_logprobs.double())[m], exp.advantages.double()[m]
    ratio = d.exp()
    clipped = -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range) > -adv * ratio  # TRL's clipfrac
    assert math.isfinite(loss) and set(figures) == set(ppo_update.POLICY_FIGURES)
    assert figures["entropy"] == pytest.approx(float(entropy[m].mean()), abs=1e-5)
    assert figures["approx_kl"] == pytest.approx(float((ratio - 1 - d).mean()), abs=1e-5)
    assert figures["clip_frac"] == pytest.approx(float(clipped.double().mean()), rel=1e-6) and 0 < clipped.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_old_logprobs_from_generation_equal_a_recompute_and_ref_logprobs_the_sft_model(data, rm, temperature):
    exp, figures, models, pristine, cfg = experience(data, rm, "ppo", temperature=temperature)
    engine = models.actor
    engine.eval()
    with torch.no_grad():
        recomputed = engine.token_logprobs(exp.sequences, exp.attention_mask, exp.start, temperature)
    engine.train()
    assert (exp.old_logprobs - recomputed).abs().max() < ATOL
    ref = hf_logprobs(pristine, exp.sequences, exp.attention_mask, exp.start, temperature)
    assert (exp.ref_logprobs.double() - ref).abs().max() < ATOL
    frozen = FrozenPolicy(copy.deepcopy(pristine)).token_logprobs(exp.sequences, exp.attention_mask, exp.start,
                                                                  temperature)
    assert torch.equal(exp.ref_logprobs, frozen)
    assert (exp.old_logprobs - exp.ref_logprobs).abs().max() > 1e-2  # the actor did move off the reference
    kl = ((exp.old_logprobs - exp.ref_logprobs) * exp.mask).sum(1)
    assert torch.allclose(exp.kl, kl) and figures["kl"] == pytest.approx(float(kl.double().mean()), abs=1e-6)


@pytest.mark.parametrize("setting", [dict(weight_dtype="bf16"), dict(kv_dtype="bf16"), dict(kv_dtype="fp16")],
                         ids=["bf16-weights", "bf16-kv-cache", "fp16-kv-cache"])
def test_recomputed_old_logprobs_with_bf16_generation(data, rm, setting):
    exp, figures, models, _, cfg = experience(data, rm, "ppo", train_batch_size=2, generation=setting)
    assert models.actor.settings == GenerationSettings(**setting)
    assert models.actor.settings.kv_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        setting.get("kv_dtype"), torch.float32)
    assert figures["logprob_source"] == "recomputed"
    engine = models.actor.eval()
    with torch.no_grad():
        recomputed = engine.token_logprobs(exp.sequences, exp.attention_mask, exp.start, cfg.temperature)
    assert torch.equal(exp.old_logprobs, recomputed)


def length_score(prompts, completions, **fields):
    return [len(c.split()) / 4 for c in completions]


@torch.no_grad()
def test_scores_are_the_reward_models_plus_the_weighted_reward_function(data, rm):
    exp, figures, _, _, cfg = experience(data, rm, "ppo", reward_fn=length_score, reward_fn_weight=0.5)
    by_rm = rm.score(exp.sequences, exp.attention_mask).double()
    by_fn = torch.tensor(length_score(None, exp.completions), dtype=torch.float64)
    assert (exp.scores.double() - (by_rm + 0.5 * by_fn)).abs().max() < ATOL
    assert figures["rm_score"] == pytest.approx(float(by_rm.mean()), abs=ATOL)
    assert figures["fn_score"] == pytest.approx(float(by_fn.mean()))
    decoded = tokenizer().batch_decode(exp.sequences[:, exp.start :], skip_special_tokens=True)
    assert exp.completions == decoded


@torch.no_grad()
def test_ppo_targets_are_the_kl_penalised_rewards_and_gae_of_the_critics_values(data, rm):
    exp, _, models, _, cfg = experience(data, rm, "ppo", kl_coef=0.3, clip_reward=0.2, gamma=0.9, lam=0.8)
    critic = copy.deepcopy(models.critic_model).eval()
    values = critic.values(exp.sequences, exp.attention_mask)[:, exp.start - 1 : -1]  # the state before each token
    assert (exp.old_values - values).abs().max() < ATOL
    rewards = losses.kl_penalized_rewards(exp.old_logprobs, exp.ref_logprobs, exp.scores, exp.mask, 0.3, 0.2)
    advantages, returns = losses.advantages_and_returns(rewards, exp.old_values, exp.mask, 0.9, 0.8)
    assert torch.equal(exp.rewards, rewards)
    assert torch.equal(exp.advantages, advantages) and torch.equal(exp.returns, returns)
    assert exp.scores.abs().max() > 0.2  # the clip did act on some score


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_advantages_are_the_baselines_over_the_response(data, rm, algo):
    exp, _, _, _, cfg = experience(data, rm, algo, kl_coef=0.5, num_generations=3)
    scores = exp.scores.double()
    if algo == "rloo":
        per_sequence = losses.rloo_advantages(scores - 0.5 * exp.kl.double(), 3)
        assert not torch.allclose(per_sequence, losses.rloo_advantages(scores, 3))  # the KL term matters
    else:
        per_sequence = losses.grpo_advantages(scores, 3)
    assert torch.allclose(exp.advantages, per_sequence.float()[:, None] * exp.mask, atol=1e-6, rtol=0)
    assert (exp.advantages[exp.mask == 0] == 0).all()


def test_whitened_advantages(data, rm):
    exp, _, _, _, _ = experience(data, rm, "grpo", whiten_advantages=True)
    per_sequence = losses.grpo_advantages(exp.scores.double(), 2).float()[:, None] * exp.mask
    assert torch.allclose(exp.advantages, losses.whiten(per_sequence, exp.mask), atol=1e-6, rtol=0)


def test_select_cuts_rows_and_response_columns():
    B, P, R = 3, 2, 4
    lengths = torch.tensor([4, 1, 2])
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()  # (B, R)
    table = torch.arange(B * R, dtype=torch.float32).view(B, R)
    seqs = torch.arange(B * (P + R)).view(B, P + R)
    exp = xp.Experience(sequences=seqs, attention_mask=torch.cat([torch.ones(B, P), mask], 1), start=P, mask=mask,
                        old_logprobs=table, ref_logprobs=table + 100, scores=torch.tensor([1.0, 2.0, 3.0]),
                        advantages=table + 200, returns=table + 300, completions=["a", "b", "c"])
    cut = exp.select([2, 1])
    assert cut.start == P and cut.completions == ["c", "b"] and cut.old_values is None and cut.rewards is None
    assert torch.equal(cut.sequences, seqs[[2, 1], : P + 2]) and cut.attention_mask.shape == (2, P + 2)
    for name, offset in (("old_logprobs", 0), ("ref_logprobs", 100), ("advantages", 200), ("returns", 300)):
        assert torch.equal(getattr(cut, name), table[[2, 1], :2] + offset), name
    assert torch.equal(cut.mask, mask[[2, 1], :2]) and torch.equal(cut.scores, torch.tensor([3.0, 2.0]))
    assert exp.select(range(3)).mask.shape == (3, R)
    assert torch.equal(exp.select([1]).kl, exp.kl[[1]])


# -- the trainer end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_train_ppo_runs_three_steps(data, rm, captured, algo):
    actor = demo_actor()
    start, rm_start = weights(actor), weights(rm)
    records = []
    result = run(data, config(algo, eval_every=2), rm, actor=actor, eval_fn=rule_score_batch,
                 log=lambda step, r: records.append((step, r)))
    assert result.steps == 3 and len(result.history) == 3 and result.skipped == 0
    assert [r["step"] for r in result.history] == [1, 2, 3]
    for r in result.history:
        assert math.isfinite(r["policy_loss"]) and math.isfinite(r["score"]) and math.isfinite(r["kl"])
        assert ("value_loss" in r) == (algo == "ppo") and (algo != "ppo" or math.isfinite(r["value_loss"]))
        assert r["logprob_source"] == "generation" and r["skipped"] == 0
    assert result.logprob_source == "generation"
    assert result.history[0]["logprob_mismatch"] < ATOL  # the first step's check of them against a recompute
    assert not same_weights(weights(actor), start)  # trained in place
    models = captured[0]
    assert same_weights(weights(models.reference.model), start)  # the frozen reference is the SFT model
    assert same_weights(weights(models.reward.model), rm_start) and same_weights(weights(rm), rm_start)
    assert (algo == "ppo") == (result.critic is not None)
    if algo == "ppo":
        assert not same_weights(weights(result.critic), rm_start)  # the critic trained, from the reward model
    assert [s for s, _ in result.evals] == [0, 2, 3] and result.before is result.evals[0][1]
    assert abs(result.before.kl) < 1e-4  # the actor is the reference before training
    assert 0 <= result.after.rule <= 1 and result.after.reward is not None and result.after.response_len >= 1
    assert [s for s, r in records if r.get("eval")] == [0, 2, 3]
    assert [r for _, r in records if not r.get("eval")] == result.history
    linear = [1e-3, 1e-3 * 2 / 3, 1e-3 / 3]  # config's lr and critic_lr, 1e-3, decayed linearly over 3 steps
    assert [r["lr"] for r in result.history] == pytest.approx(linear, rel=1e-12)
    assert [r.get("critic_lr") for r in result.history] == (pytest.approx(linear, rel=1e-12) if algo == "ppo"
                                                            else [None] * 3)
    for r in result.history:  # each figure within its range; test_an_actor_updates_figures... checks the values
        assert 0 < r["entropy"] <= math.log(len(tokenizer())) and r["approx_kl"] >= 0 and 0 <= r["clip_frac"] <= 1
        assert 1 <= r["response_len"] <= r["response_len_max"] <= 8 and 0 <= r["truncated_frac"] <= 1
        assert [sorted(s) for s in r["samples"]] == [["completion", "prompt", "score"]] * 2


def test_bf16_generation_recomputes_the_old_logprobs(data, rm):
    result = run(data, config(max_steps=2, generation={"weight_dtype": "bf16"}, train_batch_size=2), rm)
    assert result.logprob_source == "recomputed" and len(result.history) == 2
    assert all(r["logprob_source"] == "recomputed" and math.isfinite(r["policy_loss"]) for r in result.history)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_identical_runs_are_identical_to_the_bit(data, rm, algo):
    runs = [run(data, config(algo, max_steps=2), rm, eval_fn=rule_score_batch) for _ in range(2)]
    # Every figure of a step record but its times (the keys ending in _s) is the same to the bit.
    histories = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in res.history] for res in runs]
    assert histories[0] == histories[1]
    assert runs[0].evals == runs[1].evals
    assert same_weights(weights(runs[0].actor.module), weights(runs[1].actor.module))


def test_a_different_seed_gives_a_different_run(data, rm):
    a, b = (run(data, config(max_steps=1, seed=s), rm) for s in (1, 2))
    assert a.history[0]["score"] != b.history[0]["score"]


# -- reward functions ----------------------------------------------------------------------------------------------


def test_a_reward_function_from_a_file_scores_the_completions(data, tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text("def words(prompts, completions, **fields):\n"
                    "    return [len(c.split()) / 4 for c in completions]\n")
    exp, figures, *_ = experience(data, None, "grpo", reward_fn=f"{path}:words")
    assert torch.equal(exp.scores, torch.tensor(length_score(None, exp.completions), dtype=torch.float32))
    assert "rm_score" not in figures and figures["fn_score"] == pytest.approx(float(exp.scores.double().mean()))
    assert load_reward_fn(f"{path}:words")(prompts=[], completions=["a b"]) == [0.5]


def test_a_reward_function_gets_each_rows_fields_aligned_with_its_completions(tmp_path):
    rows = [{"prompt": f"tell me about a fox number {i}", "answer": f"answer {i}"} for i in range(8)]
    data = StepData(train=datasets.Dataset.from_list(rows), eval=datasets.Dataset.from_list(rows[:2]), reports=[])
    calls = []

    def check_fields(prompts, completions, answer):
        calls.append((prompts, answer))
        return [float(len(c)) for c in completions]

    result = run(data, config("grpo", max_steps=2, num_generations=3), reward_fn=check_fields)
    # 2 rollouts of 4 prompts x 3 samples; the held-out evaluations before and after (2 prompts, 1 sample each)
    assert len(result.history) == 2 and [len(p) for p, _ in calls] == [2, 12, 12, 2]
    for prompts, answers in calls:
        assert len(prompts) == len(answers)
        for p, a in zip(prompts, answers):
            assert a == "answer " + p.rsplit(" ", 1)[1]  # the answer of the prompt's own row
    assert all(len(set(calls[1][0][i : i + 3])) == 1 for i in range(0, 12, 3))  # a prompt's samples in a row


def test_a_callable_reward_function_is_used_alone(data):
    result = run(data, config("rloo", max_steps=2), reward_fn=rule_score_batch, eval_fn=rule_score_batch)
    assert len(result.history) == 2 and result.after.reward is None and result.after.rule is not None
    assert all("rm_score" not in r and 0 <= r["fn_score"] <= 1 for r in result.history)
    # the reward function's held-out mean is reported too: here it is the same rule as eval_fn, on the same draws
    assert [e.reward_fn for _, e in result.evals] == [e.rule for _, e in result.evals]


def test_the_held_out_reward_function_score_is_reported_without_an_eval_function(data):
    result = run(data, config("rloo", max_steps=1), reward_fn=rule_score_batch)
    before, after = result.evals[0][1], result.evals[-1][1]
    assert before.reward is None and before.rule is None  # no reward model, no eval function
    assert 0 <= before.reward_fn <= 1 and 0 <= after.reward_fn <= 1


@pytest.mark.parametrize("spec, match", [
    ("no_colon_here", r"given as 'module:function', 'file.py:function' or 'package.module.function', got "
                      r"'no_colon_here'"),
    (42, r"'module:function', 'file.py:function' or 'package.module.function', got 42"),
    ("hybrid_engine.rlhf.demo.no_such_fn", r"hybrid_engine.rlhf.demo has no function 'no_such_fn'"),
    ("/nowhere/rules.py:score", r"no such file /nowhere/rules.py"),
    ("hybrid_engine.no_such_module:score", r"cannot import module 'hybrid_engine.no_such_module'"),
    ("hybrid_engine.rlhf.demo:no_such_fn", r"hybrid_engine.rlhf.demo has no function 'no_such_fn'"),
    ("hybrid_engine.rlhf.demo:DEMO_DIR", r"has no function 'DEMO_DIR'"),
])
def test_bad_reward_function_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward_fn(spec)


def test_trls_dotted_import_path_names_a_function():
    assert load_reward_fn("hybrid_engine.rlhf.demo.rule_score_batch") is rule_score_batch
    assert load_reward_fn("hybrid_engine.rlhf.demo:rule_score_batch") is rule_score_batch


def test_a_bad_reward_function_spec_fails_before_training(data, rm):
    with pytest.raises(ValueError, match="has no function 'nope'"):
        run(data, config(), rm, reward_fn="hybrid_engine.rlhf.demo:nope")


@pytest.mark.parametrize("fn, match", [
    (lambda prompts, completions, **f: [1.0], r"<lambda>: returned 1 values for 6 completions"),  # the 6 held-out
    (lambda prompts, completions, **f: None, r"<lambda>: must return a list of one number \(or None\) per "
     r"completion, got NoneType None"),
    (lambda prompts, completions, **f: ["high"] * len(completions), r"<lambda>: completion 0 \(prompt '.*'\) got "
     r"str 'high', not a number or None"),
    (lambda prompts, completions, **f: ["0.5"] * len(completions), r"got str '0.5', not a number"),
])
def test_a_reward_function_of_the_wrong_output_is_refused(data, rm, fn, match):
    with pytest.raises(ValueError, match=match):
        run(data, config(), rm, reward_fn=fn)


# -- NaN and inf ----------------------------------------------------------------------------------------------------


def nan_on_call(n: int):
    """A reward function whose n-th call scores one completion NaN (call 1 is the held-out evaluation before
    training, call k + 1 is step k's)."""
    calls = []

    def fn(prompts, completions, **fields):
        calls.append(1)
        values = [0.1 * len(c) for c in completions]
        if len(calls) == n:
            values[1] = float("nan")
        return values

    return fn


def test_a_nan_score_skips_its_step_and_trains_on(data, rm):
    actor = demo_actor()
    snapshots = []
    log = snapshot_after_each_step(actor, snapshots)
    result = run(data, config(nonfinite="skip", ema_beta=0.5), rm, actor=actor, reward_fn=nan_on_call(3), log=log)
    assert result.steps == 3 and result.skipped == 1
    first, nan_step, third = result.history
    assert nan_step["skipped"] == 1 and math.isnan(nan_step["score"]) and "policy_loss" not in nan_step
    assert nan_step["skip_reason"].startswith("the scores (reward function fn returned nan for completion 1 (prompt")
    assert first["skipped"] == third["skipped"] == 0 and math.isfinite(third["policy_loss"])
    assert same_weights(snapshots[1], snapshots[0])  # the skipped step changed nothing
    assert not same_weights(snapshots[2], snapshots[1])  # the next one trained
    assert all(torch.isfinite(t).all() for t in result.ema.shadow)


def test_a_nan_score_stops_the_run_when_asked(data, rm):
    with pytest.raises(NonFiniteError, match=r"PPO step 2: the scores \(reward function fn returned nan for "
                       r"completion 1 \(prompt '.+'\)\) hold NaN or inf"):
        run(data, config(nonfinite="stop"), rm, reward_fn=nan_on_call(3))


def test_an_inf_score_of_a_group_algorithm_is_skipped(data):
    calls = []

    def inf_fn(prompts, completions, **fields):  # inf in step 1 (call 2; call 1 is the evaluation before training)
        calls.append(1)
        return [math.inf if len(calls) == 2 else 1.0] + [1.0] * (len(completions) - 1)

    result = run(data, config("grpo", max_steps=2), reward_fn=inf_fn)
    assert result.skipped == 1 and [r["skipped"] for r in result.history] == [1, 0]


# -- the EMA and what a run saves ------------------------------------------------------------------------------------


def test_the_ema_critic_and_actor_are_saved_and_load(data, rm, tmp_path):
    actor = demo_actor()
    snapshots = [weights(actor)]
    log = snapshot_after_each_step(actor, snapshots)
    out = tmp_path / "ppo"
    beta = 0.6
    result = run(data, config(max_steps=2, ema_beta=beta, output_dir=str(out)), rm, actor=actor, log=log)
    assert len(snapshots) == 3
    expected = snapshots[0]
    for w in snapshots[1:]:  # ema <- beta * ema + (1 - beta) * param, after each step
        expected = {k: beta * expected[k] + (1 - beta) * w[k] for k in w}
    ema = dict(transformers.AutoModelForCausalLM.from_pretrained(out / "ema").named_parameters())
    assert ema.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(ema[k], v, atol=1e-6, rtol=0), k
        lo, hi = torch.minimum(snapshots[0][k], snapshots[-1][k]), torch.maximum(snapshots[0][k], snapshots[-1][k])
        assert ((ema[k] >= lo - 1e-6) & (ema[k] <= hi + 1e-6)).float().mean() > 0.9
    assert not same_weights({k: v.detach() for k, v in ema.items()}, snapshots[-1])

    critic = RewardModel.from_pretrained(out / "critic").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8], [0, 0, 1, 9, 10]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.allclose(critic.values(ids, mask), result.critic.values(ids, mask), atol=1e-6, rtol=0)

    saved = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert same_weights({k: v.detach() for k, v in saved.named_parameters()}, snapshots[-1])
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer().pad_token_id
    prompts = collate_ppo(Prompts.of(data.eval, tokenizer(), config()).examples[:4], tokenizer().pad_token_id)
    args = dict(max_new_tokens=8, eos_token_id=tokenizer().eos_token_id, pad_token_id=tokenizer().pad_token_id)
    engine_out = result.actor.generate(prompts["input_ids"], prompts["attention_mask"], **args)
    loaded_out = generate(saved, prompts["input_ids"], prompts["attention_mask"], **args)
    assert torch.equal(engine_out.sequences, loaded_out.sequences)


def test_without_an_output_dir_nothing_is_saved(data, rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(data, config(max_steps=1), rm)
    assert result.ema is None and list(tmp_path.iterdir()) == []


# -- PTX and LoRA ----------------------------------------------------------------------------------------------------


def test_ptx_data_adds_a_pretraining_loss(data, rm, cache):
    ptx_rows = demo_rows("sft", 12, 0, cache)
    result = run(data, config(max_steps=2, ptx_coef=0.5), rm, ptx_data=ptx_rows)
    assert all(math.isfinite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in result.history)
    plain = run(data, config(max_steps=2), rm)
    assert all("ptx_loss" not in r for r in plain.history)


def test_a_lora_actor_trains(data, rm, tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    actor = demo_actor()
    start = weights(actor)
    out = tmp_path / "lora"
    result = run(data, config(max_steps=2, output_dir=str(out)), rm, actor=actor, lora=lora)
    assert len(result.history) == 2 and all(math.isfinite(r["policy_loss"]) for r in result.history)
    trained = {n: p for n, p in result.actor.module.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    saved = dict(transformers.AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert saved.keys() == start.keys()  # merged: no adapter left
    assert not same_weights({k: v.detach() for k, v in saved.items()}, start)


# -- bad settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, match", [
    (dict(algo="dpo"), r"algo must be one of \('ppo', 'grpo', 'rloo'\), got 'dpo'"),
    (dict(algo="grpo", num_generations=1), r"grpo compares samples of one prompt: num_generations must be >= 2"),
    (dict(algo="rloo", num_generations=1), r"rloo compares samples"),
    (dict(kl_coef=-0.1), r"kl_coef and ptx_coef must be >= 0"),
    (dict(ptx_coef=-1.0), r"kl_coef and ptx_coef must be >= 0"),
    (dict(nonfinite="ignore"), r"nonfinite must be 'skip' or 'stop', got 'ignore'"),
    (dict(ema_beta=1.5), r"ema_beta must be in \[0, 1\] or None"),
    (dict(generation={"weight_dtype": "fp16"}), r"generation.weight_dtype must be one of fp32, bf16, got 'fp16'"),
    (dict(generation={"kv_dtype": "int8"}), r"generation.kv_dtype must be one of fp32, bf16, fp16, got 'int8'"),
    (dict(generation={"gather": "some"}), r"generation.gather must be 'all' or 'layer'"),
    (dict(generation={"top_k": 3}), r"generation: unknown settings \['top_k'\]"),
    (dict(train_batch_size=0), r"train_batch_size must be a positive integer"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0"),
    (dict(eval_max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0"),
    (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
    (dict(clip_range=-0.2), r"clip_range must be positive"),
    (dict(batch_size=0), r"batch_size must be a positive integer"),
    (dict(log_samples=-1), r"log_samples must be a non-negative integer, got -1"),
])
def test_bad_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**fields)


def test_the_earlier_flat_generation_settings_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match=r"generation_kv_dtype=\.\.\.\) is now .*GenerationSettings\(kv_dtype"):
        old = PPOConfig(generation_weight_dtype="bf16", generation_kv_dtype="bf16")
    assert old.generation == GenerationSettings(weight_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    assert old == PPOConfig(generation={"weight_dtype": "bf16", "kv_dtype": "bf16"}) and old.inexact_logprobs
    with pytest.raises(ValueError, match=r"generation.weight_dtype must be one of fp32, bf16, got 'fp16'"), \
            pytest.warns(FutureWarning):
        PPOConfig(generation_weight_dtype="fp16")  # the same check and error as the new spelling


def test_a_checkpoint_of_the_earlier_flat_settings_reads_as_todays():
    saved = {"lr": 1e-3, "generation_weight_dtype": "bf16", "generation_kv_dtype": "fp32"}
    assert saved_config(saved) == {"lr": 1e-3, "generation": {"weight_dtype": "bf16", "inference_tp_size": 1,
                                                              "gather": "all", "kv_dtype": "fp32",
                                                              "activation_dtype": "fp32"}}
    today = config_json(PPOConfig(generation={"weight_dtype": "bf16"}))
    assert saved_config(today) == today and today["generation"]["weight_dtype"] == "bf16"
    # written before activation_dtype existed: the default it ran with
    before = {**today, "generation": {k: v for k, v in today["generation"].items() if k != "activation_dtype"}}
    assert saved_config(before) == today


def test_a_built_engine_and_the_config_must_agree_on_generation(data, rm):
    engine = build_models(ModelSources(actor=demo_actor(), reward_model=rm),
                          config(generation={"kv_dtype": "bf16"})).actor
    with pytest.raises(ValueError, match=r"the actor engine generates with .*kv_dtype=torch.bfloat16.*give the config"):
        build_models(ModelSources(actor=engine, reward_model=rm, reference=demo_actor()), config())


def _gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 over the demo vocabulary, with GPT-2's dropout (0.1 after the embeddings, in attention, after
    attention and after the MLP)."""
    config = transformers.GPT2Config(vocab_size=len(tokenizer()), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _dropout_rates(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_actor_and_the_critic_unless_kept(disable):
    torch.manual_seed(11)
    models = build_models(ModelSources(actor=_gpt2(0), reward_model=RewardModel.from_model(_gpt2(1))),
                          config(disable_dropout=disable))
    for model in (models.actor.module, models.critic_model):
        rates = _dropout_rates(model)
        assert len(rates) == 7  # after the embeddings, and 3 in each of the 2 blocks
        assert rates == ([0.0] * 7 if disable else [0.1] * 7)


def test_num_generations_defaults_by_algorithm():
    assert PPOConfig().num_generations == 1 and PPOConfig(algo="grpo").num_generations == 4
    assert PPOConfig(algo="rloo").num_generations == 4


def test_missing_models_are_clear_errors(data, rm):
    with pytest.raises(ValueError, match="PPO needs a reward: give a reward model, a reward function, or both"):
        run(data, config())
    with pytest.raises(ValueError, match="PPO's critic starts from the reward model"):
        run(data, config(), reward_fn=rule_score_batch)
    engine = build_models(ModelSources(actor=demo_actor(), reward_model=rm), config()).actor
    with pytest.raises(ValueError, match="already a HybridEngine: give the reference policy"):
        run(data, config(), rm, actor=engine)
    empty = StepData(train=data.train.select([]), eval=data.eval, reports=[])
    with pytest.raises(ValueError, match="no PPO prompts left"):
        run(empty, config(), rm)


def test_a_reward_model_without_a_trained_head_is_refused(data, tmp_path):
    plain = tmp_path / "plain"
    demo_actor().save_pretrained(plain)  # an SFT model: no value_head.safetensors, no classifier head
    with pytest.raises(ValueError, match="holds no reward model: neither value_head.safetensors nor a sequence cl"):
        run(data, config(max_steps=1), rm=str(plain))
    with pytest.raises(ValueError, match="a plain model has no trained value head"):
        run(data, config(max_steps=1), rm=demo_actor())
    with pytest.raises(ValueError, match="body is a base model, got the causal LM LlamaForCausalLM"):
        RewardModel(demo_actor())


@pytest.mark.parametrize("train_batch_size", [4, 2])
def test_bf16_autocast_trains_with_old_logprobs_of_its_own_precision(data, rm, train_batch_size):
    result = run(data, config(max_steps=2, bf16_autocast=True, train_batch_size=train_batch_size), rm=rm)
    # One minibatch per rollout: the ratio uses the training forward itself; two: a bf16 recompute.
    assert result.logprob_source == (ON_POLICY if train_batch_size == 4 else "recomputed")
    for record in result.history:
        assert math.isfinite(record["policy_loss"]) and math.isfinite(record["value_loss"])


def test_the_on_policy_ratio_is_exactly_one_at_the_first_update(data, rm, monkeypatch):
    seen = []
    real = ppo_update.policy_loss
    monkeypatch.setattr(ppo_update, "policy_loss", lambda lp, old, *a, **k: seen.append(torch.equal(lp.detach(), old))
                        or real(lp, old, *a, **k))
    run(data, config(max_steps=1, generation={"weight_dtype": "bf16"}), rm=rm)
    assert seen == [True]


def test_a_mixture_of_experts_actor_reports_its_router_loss_and_a_dense_one_does_not(data, rm):
    """GRPO on a tiny Mixtral: each step's record holds the router's load-balancing loss of the actor's forwards (HF's,
    observed and not added to the policy loss)."""
    moe = run(data, config("grpo", max_steps=2), rm, actor=demo_mixtral())
    assert all(r["router_aux_loss"] > 0 and math.isfinite(r["policy_loss"]) for r in moe.history if not r.get("eval"))
    assert "router_aux_loss" not in run(data, config("grpo", max_steps=1), rm).history[0]
