"""The HF baseline of bench_rlhf.py's ppo cases (what the DeepSpeed-Chat paper calls the HF baseline): PPO as a
user writes it with Hugging Face transformers and eager PyTorch, the algorithm of hybrid_engine.rlhf.train_ppo
with algo "ppo" (DeepSpeed-Chat's step 3), and none of hybrid_engine's engine or kernels.

Each step reads top to bottom (train_step):
1. generate: model.generate samples num_generations responses per prompt (temperature 1, no top-k or top-p);
2. score: the actor's and the frozen reference's log-probs of the responses by full forwards ([B, T, V] logits,
   log_softmax, gather), the critic's values, the reward function's scores;
3. rewards and advantages: -kl_coef * (old - ref) on every response token plus the clipped score on the last one,
   then GAE over the critic's values;
4. optimise: ppo_epochs passes over minibatches of train_batch_size: an AdamW step of the actor on the clipped
   policy loss and one of the critic on the clipped value loss, each after clipping its gradient norm.

The critic is a causal LM's body with a linear value head, read from a folder as hybrid_engine's RewardModel saves
it (a sequence classifier with one label, its head's bias in config.score_bias), so that both PPOs start from the
same critic. With bf16, the
training forwards of phase 4 run under torch.autocast("cpu", torch.bfloat16) (fp32 weights, optimizer and losses),
as transformers' Trainer with bf16=True; generation and the forwards of phase 2 stay fp32.

Timing: a step's time_s is a wall clock from train_step's first call to the end of its last optimizer step; the
phases are timed apart from it, each by its own clock (generate: the generate call; experience: phases 2 and 3;
train: phase 4), so that their sum is at most time_s, short of it by the work between them.

Shapes: B sequences (prompts x samples), P the left-padded prompt width, R the longest response, V the vocabulary.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers


@dataclass
class HFPPOConfig:
    """The baseline's settings; the defaults are hybrid_engine's PPOConfig's (DeepSpeed-Chat's step 3)."""

    lr: float = 9.65e-6
    """The actor's learning rate (constant)."""
    critic_lr: float = 5e-6
    """The critic's learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW's weight decay, both models."""
    num_generations: int = 1
    """Samples per prompt."""
    train_batch_size: int = 16
    """Sequences per optimisation minibatch."""
    ppo_epochs: int = 1
    """Passes of phase 4 over each rollout batch."""
    max_new_tokens: int = 256
    """The longest response."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs are taken at it too."""
    kl_coef: float = 0.1
    """The KL penalty's coefficient on the rewards."""
    clip_reward: float = 5.0
    """Scores are clipped to [-clip_reward, clip_reward]."""
    clip_range: float = 0.2
    """The policy ratio's clip range."""
    value_clip_range: float = 0.2
    """The value clip range."""
    gamma: float = 1.0
    """GAE's discount."""
    lam: float = 0.95
    """GAE's lambda."""
    max_grad_norm: float = 1.0
    """Each model's gradients are clipped to this global L2 norm."""
    bf16: bool = False
    """bf16 autocast around the training forwards."""
    seed: int = 1234
    """torch's global seed, set once before training."""


class ValueModel(torch.nn.Module):
    """The critic: a causal LM's body and a linear value head, a value at every position."""

    def __init__(self, directory: str | Path):
        super().__init__()
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
        self.body = classifier.base_model
        self.head = torch.nn.Linear(classifier.score.in_features, 1)
        with torch.no_grad():  # score has no bias: hybrid_engine keeps its value head's in config.score_bias
            self.head.weight.copy_(classifier.score.weight)
            self.head.bias.fill_(getattr(classifier.config, "score_bias", 0.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()  # (B, T)


@dataclass
class Models:
    actor: transformers.PreTrainedModel
    reference: transformers.PreTrainedModel
    critic: ValueModel
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer


def load_models(actor_dir: str | Path, critic_dir: str | Path, config: HFPPOConfig) -> Models:
    actor = transformers.AutoModelForCausalLM.from_pretrained(actor_dir, dtype=torch.float32)
    reference = copy.deepcopy(actor).eval().requires_grad_(False)
    critic = ValueModel(critic_dir)
    return Models(actor=actor, reference=reference, critic=critic,
                  actor_opt=torch.optim.AdamW(actor.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                              fused=True),
                  critic_opt=torch.optim.AdamW(critic.parameters(), lr=config.critic_lr,
                                               weight_decay=config.weight_decay, fused=True))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0 at each left-padded row's first token, as generate counts them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, start: int,
                   temperature: float) -> torch.Tensor:
    """(B, R): log p(token) of every response token (columns start: of `sequences`), from one full forward."""
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False).logits  # (B, T, V)
    logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T - 1, V)
    return logprobs.gather(-1, sequences[:, 1:, None]).squeeze(-1)[:, start - 1:]  # (B, R)


# -- 1. generate ------------------------------------------------------------------------------------------------


def response_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """int64 [B, n]: 1 for each generated token up to and including the first eos, 0 after."""
    eos = (tokens == eos_token_id).long()
    return ((eos.cumsum(1) - eos) == 0).long()  # no eos before this token


@torch.no_grad()
def generate(actor, tokenizer, prompts: list[str], config: HFPPOConfig) -> dict:
    """num_generations samples of every prompt (consecutive): sequences, attention_mask (B, P + R), start = P and
    the response mask (B, R), 1 up to and with each response's EOS."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts for _ in
             range(config.num_generations)]
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    sequences = actor.generate(**inputs, do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0,
                               max_new_tokens=config.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)  # (B, P + R)
    start = inputs["input_ids"].shape[1]
    mask = response_mask(sequences[:, start:], tokenizer.eos_token_id).float()  # (B, R)
    attention_mask = torch.cat([inputs["attention_mask"], mask.long()], 1)
    return {"sequences": sequences, "attention_mask": attention_mask, "start": start, "mask": mask}


# -- 3. rewards and advantages ----------------------------------------------------------------------------------


def compute_rewards(old: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, clip_reward: float) -> torch.Tensor:
    """(B, R): the KL penalty on every response token, the clipped score added on the last one."""
    rewards = -kl_coef * (old - ref) * mask
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(last)), last] += scores.clamp(-clip_reward, clip_reward)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, R) each: the backward GAE loop, rewards and values zeroed after each response."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    return advantages * mask, (advantages + values) * mask


# -- 4. losses --------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def actor_loss(logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    """The clipped surrogate loss over (B, R) response tokens, their mean."""
    ratio = torch.exp((logprobs - old) * mask)
    return masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)),
                       mask)


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> torch.Tensor:
    """The clipped value loss over (B, R) response tokens: half the mean of the larger squared error."""
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# -- the step ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def make_experience(models: Models, tokenizer, prompts: list[str], reward_fn: Callable,
                    config: HFPPOConfig) -> dict:
    """Phase 1, a rollout, and phases 2 and 3 on it: old and reference log-probs, values, scores, advantages, returns;
    generate_s and experience_s, each phase's own clock."""
    models.actor.eval()
    t0 = time.perf_counter()
    ro = generate(models.actor, tokenizer, prompts, config)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq, att, start, mask = ro["sequences"], ro["attention_mask"], ro["start"], ro["mask"]
    old = token_logprobs(models.actor, seq, att, start, config.temperature)
    ref = token_logprobs(models.reference, seq, att, start, config.temperature)
    values = models.critic(seq, att)[:, start - 1:-1]  # the value before each response token
    completions = tokenizer.batch_decode(seq[:, start:], skip_special_tokens=True)
    repeated = [p for p in prompts for _ in range(config.num_generations)]
    scores = torch.tensor(reward_fn(prompts=repeated, completions=completions), dtype=torch.float32)
    rewards = compute_rewards(old, ref, scores, mask, config.kl_coef, config.clip_reward)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    return dict(ro, old=old, ref=ref, values=values, advantages=advantages, returns=returns, scores=scores,
                kl=((old - ref) * mask).sum(1), generate_s=generate_s, experience_s=time.perf_counter() - t0)


def _step(loss: torch.Tensor, model: torch.nn.Module, optimizer, config: HFPPOConfig) -> float:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def optimise(models: Models, exp: dict, config: HFPPOConfig) -> dict:
    """Phase 4: ppo_epochs passes over minibatches; the mean losses."""
    models.actor.train()
    B = exp["sequences"].shape[0]
    actor_losses, critic_losses = [], []
    for _ in range(config.ppo_epochs):
        for lo in range(0, B, config.train_batch_size):
            mb = {k: v[lo:lo + config.train_batch_size] if torch.is_tensor(v) else v for k, v in exp.items()}
            seq, att, start, mask = mb["sequences"], mb["attention_mask"], mb["start"], mb["mask"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                logprobs = token_logprobs(models.actor, seq, att, start, config.temperature)
            loss = actor_loss(logprobs, mb["old"], mb["advantages"], mask, config.clip_range)
            actor_losses.append(_step(loss, models.actor, models.actor_opt, config))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                values = models.critic(seq, att)[:, start - 1:-1]
            loss = critic_loss(values, mb["values"], mb["returns"], mask, config.value_clip_range)
            critic_losses.append(_step(loss, models.critic, models.critic_opt, config))
    return {"policy_loss": sum(actor_losses) / len(actor_losses), "value_loss": sum(critic_losses) / len(critic_losses)}


def train_step(models: Models, tokenizer, prompts: list[str], reward_fn: Callable, config: HFPPOConfig) -> dict:
    """One PPO step on `prompts`; its figures: time_s (the step's wall clock), the phases' own times (generate_s,
    experience_s, train_s), the mean score, KL, losses and generated tokens."""
    start = time.perf_counter()
    exp = make_experience(models, tokenizer, prompts, reward_fn, config)
    t0 = time.perf_counter()
    record = optimise(models, exp, config)
    end = time.perf_counter()
    record.update(time_s=end - start, generate_s=exp["generate_s"], experience_s=exp["experience_s"],
                  train_s=end - t0, reward=float(exp["scores"].mean()), kl=float(exp["kl"].mean()),
                  completion_tokens=int(exp["mask"].sum()))
    return record


def train(actor_dir: str | Path, critic_dir: str | Path, tokenizer, batches: list[list[str]], reward_fn: Callable,
          config: HFPPOConfig) -> list[dict]:
    """One PPO step per batch of prompts, from the actor (and reference) in actor_dir and the critic in
    critic_dir; the figures of every step. reward_fn(prompts=..., completions=...) gives one score each."""
    torch.manual_seed(config.seed)
    models = load_models(actor_dir, critic_dir, config)
    return [train_step(models, tokenizer, prompts, reward_fn, config) for prompts in batches]
