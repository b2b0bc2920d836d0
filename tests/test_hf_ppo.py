"""hybrid_engine.benchmarks.hf_ppo, the HF baseline PPO of bench_rlhf.py: its defaults and formulas are ours
(PPOConfig, losses.py, the gae op's reference), and one step trains both of its models."""

import dataclasses
from pathlib import Path

import torch
import transformers

from hybrid_engine.benchmarks import hf_ppo
from hybrid_engine.ops import gae_reference
from hybrid_engine.rlhf import PPOConfig, losses
from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch
from hybrid_engine.rlhf.ppo import ModelSources, build_models
from hybrid_engine.rlhf.ppo import batch as xp
from hybrid_engine.rlhf.ppo.update import optimise
from hybrid_engine.rlhf.reward import RewardModel


def _case(B: int = 5, R: int = 11):
    """Random (B, R) log-probs, values and a right-padded response mask (lengths 1..R, one full row)."""
    lengths = torch.tensor([1, R, 4, 7, R - 1][:B])
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return torch.randn(B, R), torch.randn(B, R), torch.randn(B, R), torch.randn(B), mask


def test_defaults_are_ppo_configs():
    ours = PPOConfig(algo="ppo")
    for f in dataclasses.fields(hf_ppo.HFPPOConfig):
        if f.name != "bf16":
            assert getattr(hf_ppo.HFPPOConfig(), f.name) == getattr(ours, f.name), f.name


def test_rewards_and_gae_match_ours():
    old, ref, values, scores, mask = _case()
    scores = scores * 4  # some beyond the clip
    rewards = hf_ppo.compute_rewards(old, ref, scores, mask, 0.1, 5.0)
    torch.testing.assert_close(rewards, losses.kl_penalized_rewards(old, ref, scores, mask, 0.1, 5.0))
    advantages, returns = hf_ppo.gae(rewards, values, mask, 0.99, 0.95)
    want_adv, want_ret = gae_reference(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(advantages, want_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, want_ret, atol=1e-6, rtol=0)


def test_losses_match_ours():
    logprobs, old, advantages, _, mask = _case()
    old = logprobs + 0.3 * torch.randn_like(logprobs)  # ratios on both sides of the clip
    torch.testing.assert_close(hf_ppo.actor_loss(logprobs, old, advantages, mask, 0.2),
                               losses.policy_loss(logprobs, old, advantages, mask, 0.2))
    values, returns = torch.randn_like(old), torch.randn_like(old)
    old_values = values + 0.3 * torch.randn_like(values)
    torch.testing.assert_close(hf_ppo.critic_loss(values, old_values, returns, mask, 0.2),
                               losses.value_loss(values, old_values, returns, mask, 0.2))


def _tiny_dirs(tmp_path: Path, tok) -> tuple[Path, Path]:
    """A 1-layer Llama over the demo tokenizer, and a critic on its body with a fresh value head."""
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "actor")
    RewardModel.from_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "actor")).save_pretrained(
        tmp_path / "critic")
    return tmp_path / "actor", tmp_path / "critic"


def test_one_step_trains_actor_and_critic(tmp_path):
    tok = demo_tokenizer()
    actor_dir, critic_dir = _tiny_dirs(tmp_path, tok)
    cfg = hf_ppo.HFPPOConfig(lr=1e-3, critic_lr=1e-3, num_generations=2, train_batch_size=2, max_new_tokens=6, seed=0)
    models = hf_ppo.load_models(actor_dir, critic_dir, cfg)
    actor0 = [p.detach().clone() for p in models.actor.parameters()]
    critic0 = [p.detach().clone() for p in models.critic.parameters()]
    record = hf_ppo.train_step(models, tok, ["tell me about a fox", "hi"], rule_score_batch, cfg)
    assert all(record[k] > 0 for k in ("time_s", "generate_s", "experience_s", "train_s", "completion_tokens"))
    assert record["generate_s"] + record["experience_s"] + record["train_s"] < record["time_s"]  # a wall clock
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("reward", "kl", "policy_loss", "value_loss"))
    assert any(not torch.equal(a, p) for a, p in zip(actor0, models.actor.parameters()))
    assert any(not torch.equal(c, p) for c, p in zip(critic0, models.critic.parameters()))
    reference = dict(models.reference.named_parameters())
    assert all(torch.equal(a, reference[n]) for a, (n, _) in zip(actor0, models.actor.named_parameters()))


def test_step_equals_ours_on_the_same_rollout(tmp_path):
    """On the baseline's rollout, train_ppo's pieces give the same log-probs, values, advantages and update."""
    tok = demo_tokenizer()
    actor_dir, critic_dir = _tiny_dirs(tmp_path, tok)
    cfg = hf_ppo.HFPPOConfig(lr=1e-3, num_generations=2, train_batch_size=8, max_new_tokens=8, seed=0)
    ours_cfg = PPOConfig(algo="ppo", lr=1e-3, num_generations=2, batch_size=4, train_batch_size=8, max_new_tokens=8,
                         schedule="constant", seed=0)
    theirs = hf_ppo.load_models(actor_dir, critic_dir, cfg)
    sources = ModelSources(actor=str(actor_dir), critic=str(critic_dir), reward_fn=rule_score_batch)
    ours = build_models(sources, ours_cfg)
    prompts = ["tell me about a fox", "describe the weather in paris today", "hi", "tell me about a cat"]
    exp = hf_ppo.make_experience(theirs, tok, prompts, rule_score_batch, cfg)
    seq, att, start, mask = exp["sequences"], exp["attention_mask"], exp["start"], exp["mask"]
    with torch.no_grad():
        old = ours.actor.token_logprobs(seq, att, start)
        ref = ours.reference.token_logprobs(seq, att, start, 1.0)
        values = xp.critic_values(ours.critic.forward, seq, att, start)
    for name, got in (("old", old), ("ref", ref), ("values", values)):
        torch.testing.assert_close(got * mask, exp[name] * mask, atol=1e-5, rtol=0, msg=name)
    mine = xp.ppo_targets(xp.Experience(sequences=seq, attention_mask=att, start=start, mask=mask,
                                        old_logprobs=exp["old"], ref_logprobs=exp["ref"], scores=exp["scores"],
                                        advantages=torch.zeros_like(mask), completions=[""] * len(mask)),
                          exp["values"], cfg.kl_coef, cfg.clip_reward, cfg.gamma, cfg.lam, False)
    torch.testing.assert_close(mine.advantages, exp["advantages"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.returns, exp["returns"], atol=1e-5, rtol=0)
    optimise(ours, mine, ours_cfg, cfg.kl_coef, 1, None)
    hf_ppo.optimise(theirs, exp, cfg)
    for a, b in zip(ours.actor.module.parameters(), theirs.actor.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(ours.critic_model.parameters(), theirs.critic.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
