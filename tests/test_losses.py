"""The PPO maths (hybrid_engine.rlhf.losses) against plain loops over rows and tokens written here.

The batches are response-aligned [B, T] with right padding: one row without padding, one with a
single response token, the others of random lengths. Padding holds GARBAGE, so a result that reads
it is off by far more than any tolerance. The loops run in fp64 on Python floats (or 0-d tensors
where autograd is needed) and know nothing of the implementation.
"""

import inspect
import math

import pytest
import torch

import hybrid_engine.rlhf as rlhf
from hybrid_engine.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    advantages_and_returns,
    ema_update,
    grpo_advantages,
    kl_penalized_rewards,
    policy_loss,
    ptx_loss,
    rloo_advantages,
    value_loss,
    whiten,
)
from hybrid_engine.rlhf.losses import approx_kl, clip_fraction, token_mean

# Our result (in the input dtype) against the fp64 loop, per input dtype.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# advantages_and_returns runs through the gae op, which accumulates in fp32 whatever the input dtype.
GAE_TOL = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(1, 1), (3, 7), (5, 33), (4, 64)]
DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1]
GARBAGE = 1e3
CLIP = 0.2


# -- test data ----------------------------------------------------------------------------------


def response_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """bool [B, T]: each row's response from position 0, right-padded, lengths 1..T."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    return torch.arange(T)[None, :] < lengths[:, None]


def make_batch(B: int, T: int, dtype: torch.dtype, seed: int, garbage: float | None = GARBAGE) -> dict:
    """Rollout-shaped tensors in `dtype`; log-ratios and value moves of scale 0.3, so both clips trigger."""
    gen = torch.Generator().manual_seed(seed)
    mask = response_mask(B, T, gen)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(B, T, generator=gen, dtype=torch.float64) * scale

    old_logprobs = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    old_values = randn()
    raw = dict(
        old_logprobs=old_logprobs,
        logprobs=old_logprobs + randn(0.3),
        ref_logprobs=old_logprobs + randn(0.5),
        advantages=randn(),
        rewards=randn(),
        old_values=old_values,
        values=old_values + randn(0.3),
        returns=randn(),
    )
    batch = {k: (v if garbage is None else torch.where(mask, v, garbage)).to(dtype) for k, v in raw.items()}
    # Spread from -8 to 8, so some scores are beyond the reward clip of 5.
    batch["scores"] = (torch.linspace(-8, 8, B, dtype=torch.float64) + 0.1 * torch.randn(B, generator=gen)).to(dtype)
    batch["mask"] = mask
    return batch


def rows(x: torch.Tensor) -> list:
    return x.double().tolist()


# -- loop references ------------------------------------------------------------------------------


def loop_policy_loss(lp, old, adv, mask, c):
    """On 0-d tensors, for autograd: mean over response tokens of max(-A r, -A clip(r))."""
    total, n = 0.0 * lp[0, 0], 0  # tied to the input, so backward runs even when every token is clipped
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t]:
                ratio = torch.exp(lp[b, t] - old[b, t])
                clipped = min(max(ratio, 1 - c), 1 + c)
                total = total + max(-adv[b, t] * ratio, -adv[b, t] * clipped)
                n += 1
    return total / n


def loop_update_figures(lp, old, adv, mask, c):
    """(clip fraction, approx KL) in fp64 floats: the share of response tokens where the clipped term of the policy
    loss is the larger (TRL's pg_losses2 > pg_losses), and the mean of exp(d) - 1 - d over them, d = lp - old."""
    clipped, kl, n = 0, 0.0, 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t]:
                d = float(lp[b, t]) - float(old[b, t])
                ratio, a = math.exp(d), float(adv[b, t])
                clipped += -a * min(max(ratio, 1 - c), 1 + c) > -a * ratio
                kl += math.exp(d) - 1 - d
                n += 1
    return clipped / n, kl / n


def loop_value_loss(v, old, ret, mask, c):
    total, n = 0.0 * v[0, 0], 0  # tied to the input, so backward runs even when every token is clipped
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if mask[b, t]:
                clipped = min(max(v[b, t], old[b, t] - c), old[b, t] + c)
                total = total + max((v[b, t] - ret[b, t]) ** 2, (clipped - ret[b, t]) ** 2)
                n += 1
    return 0.5 * total / n


def loop_rewards(lp, ref, scores, mask, kl_coef, clip):
    B, T = len(lp), len(lp[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = -1
        for t in range(T):
            if mask[b][t]:
                out[b][t] = -kl_coef * (lp[b][t] - ref[b][t])
                last = t
        out[b][last] += min(max(scores[b], -clip), clip)
    return torch.tensor(out, dtype=torch.float64)


def loop_gae(rewards, values, mask, gamma, lam):
    """Per row over its n response tokens, backwards, next value 0 after the last; returns = adv + v."""
    B, T = len(rewards), len(rewards[0])
    adv, ret = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(mask[b])
        last_gae = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_gae = delta + gamma * lam * last_gae
            adv[b][t] = last_gae
            ret[b][t] = last_gae + values[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def ds_chat_rewards_advantages(log_probs, ref_log_probs, values, reward_score, action_mask, kl_ctl, clip, gamma, lam):
    """DeepSpeed-Chat's compute_rewards, train_rlhf's zeroing after `ends` and get_advantages_and_returns,
    transcribed with start = 0 (these tensors start at the response)."""
    B, T = log_probs.shape
    rewards = -kl_ctl * (log_probs - ref_log_probs)
    values = values.clone()
    ends = action_mask.long().sum(1) + 1
    reward_clip = torch.clamp(reward_score, -clip, clip)
    for j in range(B):
        rewards[j, : ends[j]][-1] += reward_clip[j]
    for i in range(B):
        rewards[i, ends[i] :] = 0
        values[i, ends[i] :] = 0
    last_gae, reversed_advantages = 0, []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return rewards, advantages, advantages + values


def loop_whiten(x, mask, shift_mean):
    B, T = len(x), len(x[0])
    picked = [x[b][t] for b in range(B) for t in range(T) if mask[b][t]]
    n = len(picked)
    mean = sum(picked) / n
    var = sum((v - mean) ** 2 for v in picked) / (n - 1)
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                out[b][t] = (x[b][t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return torch.tensor(out, dtype=torch.float64)


def loop_grpo(scores, k, eps, scale):
    out = []
    for g in range(0, len(scores), k):
        group = scores[g : g + k]
        mean = sum(group) / k
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (k - 1)) if k > 1 else 0.0
        out += [(s - mean) / (std + eps) if scale else s - mean for s in group]
    return torch.tensor(out, dtype=torch.float64)


def loop_rloo(scores, k):
    out = []
    for g in range(0, len(scores), k):
        group = scores[g : g + k]
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1 :]
            out.append(s - sum(others) / len(others) if others else 0.0)
    return torch.tensor(out, dtype=torch.float64)


# -- losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_policy_loss_and_grad_match_loop(B, T, dtype, seed):
    d = make_batch(B, T, dtype, seed)
    lp = d["logprobs"].clone().requires_grad_()
    loss = policy_loss(lp, d["old_logprobs"], d["advantages"], d["mask"].to(dtype), clip_range=CLIP)
    loss.backward()
    lp64 = d["logprobs"].double().requires_grad_()
    ref = loop_policy_loss(lp64, d["old_logprobs"].double(), d["advantages"].double(), d["mask"], CLIP)
    ref.backward()
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(lp.grad.double(), lp64.grad, **TOL[dtype])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_value_loss_and_grad_match_loop(B, T, dtype, seed):
    d = make_batch(B, T, dtype, seed)
    v = d["values"].clone().requires_grad_()
    loss = value_loss(v, d["old_values"], d["returns"], d["mask"], clip_range=CLIP)  # a bool mask
    loss.backward()
    v64 = d["values"].double().requires_grad_()
    ref = loop_value_loss(v64, d["old_values"].double(), d["returns"].double(), d["mask"], CLIP)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(v.grad.double(), v64.grad, **TOL[dtype])


def test_clip_regions_trigger_in_the_test_data():
    """Both clips change the loss on some tokens of the data above: the clipped branch wins the max."""
    for B, T in SHAPES[2:]:
        for seed in SEEDS:
            d = make_batch(B, T, torch.float64, seed)
            m = d["mask"]
            ratio = torch.exp(d["logprobs"] - d["old_logprobs"])[m]
            adv = d["advantages"][m]
            assert (ratio < 1 - CLIP).any() and (ratio > 1 + CLIP).any()
            assert (-adv * ratio.clamp(1 - CLIP, 1 + CLIP) > -adv * ratio).any()
            v, old, ret = d["values"][m], d["old_values"][m], d["returns"][m]
            assert ((v - old).abs() > CLIP).any()
            assert ((torch.clamp(v, old - CLIP, old + CLIP) - ret) ** 2 > (v - ret) ** 2).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_ptx_loss_matches_loop(B, T, dtype):
    d = make_batch(B, T, dtype, 0)
    loss = ptx_loss(d["logprobs"], d["mask"].long())  # an integer mask
    lp, mask = rows(d["logprobs"]), d["mask"].tolist()
    picked = [lp[b][t] for b in range(B) for t in range(T) if mask[b][t]]
    ref = torch.tensor(-sum(picked) / len(picked), dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype])


# -- rewards, advantages, returns ---------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_kl_penalized_rewards_match_loop(B, T, dtype, seed):
    d = make_batch(B, T, dtype, seed)
    ours = kl_penalized_rewards(d["logprobs"], d["ref_logprobs"], d["scores"], d["mask"].to(dtype))
    ref = loop_rewards(rows(d["logprobs"]), rows(d["ref_logprobs"]), rows(d["scores"]), d["mask"].tolist(), 0.1, 5.0)
    assert ours.dtype == dtype and (d["scores"].abs() > 5).any()
    torch.testing.assert_close(ours.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_advantages_and_returns_match_loop(B, T, dtype, seed, gamma, lam):
    d = make_batch(B, T, dtype, seed)
    values = d["values"].clone().requires_grad_()
    adv, ret = advantages_and_returns(d["rewards"], values, d["mask"].to(dtype), gamma=gamma, lam=lam)
    adv_ref, ret_ref = loop_gae(rows(d["rewards"]), rows(d["values"]), d["mask"].tolist(), gamma, lam)
    assert adv.dtype == ret.dtype == dtype
    assert not adv.requires_grad and not ret.requires_grad
    torch.testing.assert_close(adv.double(), adv_ref, **GAE_TOL)
    torch.testing.assert_close(ret.double(), ret_ref, **GAE_TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", SHAPES)
def test_mask_extended_by_one_reproduces_deepspeed_chat(B, T, seed):
    """DeepSpeed-Chat scores and keeps one slot after the last response token; extending the mask by
    one gives its rewards, advantages and returns exactly (padding is real, finite data here)."""
    d = make_batch(B, T, torch.float64, seed, garbage=None)
    mask = d["mask"]
    extended = mask.clone()
    extended[:, 1:] |= mask[:, :-1]
    ds_rewards, ds_adv, ds_ret = ds_chat_rewards_advantages(
        d["logprobs"], d["ref_logprobs"], d["values"], d["scores"], mask, 0.1, 5.0, 1.0, 0.95
    )
    rewards = kl_penalized_rewards(d["logprobs"], d["ref_logprobs"], d["scores"], extended)
    adv, ret = advantages_and_returns(rewards, d["values"], extended)
    torch.testing.assert_close(rewards, ds_rewards, **TOL[torch.float64])
    torch.testing.assert_close(adv, ds_adv, **GAE_TOL)
    torch.testing.assert_close(ret, ds_ret, **GAE_TOL)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES[1:])
def test_whiten_matches_loop(B, T, dtype, seed, shift_mean):
    d = make_batch(B, T, dtype, seed)
    x = d["advantages"] * 3 + 1
    ours = whiten(x, d["mask"], shift_mean=shift_mean)
    torch.testing.assert_close(ours.double(), loop_whiten(rows(x), d["mask"].tolist(), shift_mean), **TOL[dtype])


# -- group baselines ----------------------------------------------------------------------------

GROUPS = [(1, 2), (3, 4), (5, 8), (2, 3), (4, 1)]  # (prompts, generations per prompt)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prompts,k", GROUPS)
def test_grpo_advantages_match_loop(prompts, k, dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(prompts * k, generator=gen, dtype=torch.float64).to(dtype)
    ours = grpo_advantages(scores, k, scale=scale)
    assert ours.shape == scores.shape and ours.dtype == dtype
    torch.testing.assert_close(ours.double(), loop_grpo(rows(scores), k, 1e-4, scale), **TOL[dtype])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prompts,k", GROUPS)
def test_rloo_advantages_match_loop(prompts, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(prompts * k, generator=gen, dtype=torch.float64).to(dtype)
    ours = rloo_advantages(scores, k)
    torch.testing.assert_close(ours.double(), loop_rloo(rows(scores), k), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_scores_in_a_group_give_zero_advantages(dtype):
    # Dyadic scores: the group means are exact, so the advantages are exactly 0.
    scores = torch.tensor([-1.5, 0.25, 2.0, 3.75], dtype=dtype).repeat_interleave(3)
    assert (grpo_advantages(scores, 3) == 0).all()
    assert (grpo_advantages(scores, 3, scale=False) == 0).all()
    assert (rloo_advantages(scores, 3) == 0).all()


# -- KL controllers, EMA --------------------------------------------------------------------------


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1

    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # KL above target: error 0.5 clipped to 0.2, the coefficient rises
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), rel=1e-12) and ctl.value > 0.2
    before = ctl.value
    ctl.update(torch.tensor(6.6), 100)  # above target by 10%, inside the clip
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10000), rel=1e-6) and ctl.value > before
    before = ctl.value
    ctl.update(1.0, 256)  # far below target: error clipped to -0.2, the coefficient falls
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10000), rel=1e-12) and ctl.value < before
    before = ctl.value
    ctl.update(6.0, 256)  # on target
    assert ctl.value == before


@pytest.mark.parametrize("beta", [0.992, 0.5, 0.0, 1.0])
def test_ema_update_matches_loop(beta):
    model, ema_model = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ema_before = [p.detach().clone() for p in ema_model.parameters()]
    model_before = [p.detach().clone() for p in model.parameters()]
    pointers = [p.data_ptr() for p in ema_model.parameters()]
    ema_update(ema_model.parameters(), model.parameters(), beta=beta)
    for ema, e0, p0, ptr in zip(ema_model.parameters(), ema_before, model_before, pointers):
        e, p = e0.double().flatten().tolist(), p0.double().flatten().tolist()
        expected = [beta * ei + (1 - beta) * pi for ei, pi in zip(e, p)]
        expected = torch.tensor(expected, dtype=torch.float64).view(e0.shape)
        assert ema.data_ptr() == ptr and ema.grad is None
        torch.testing.assert_close(ema.detach().double(), expected, **TOL[torch.float32])
    for p, p0 in zip(model.parameters(), model_before):
        assert torch.equal(p, p0)


def test_defaults_are_deepspeed_chats():
    def defaults(fn):
        return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}

    assert defaults(policy_loss) == {"clip_range": 0.2}
    assert defaults(value_loss) == {"clip_range": 0.2}
    assert defaults(kl_penalized_rewards) == {"kl_coef": 0.1, "clip_reward": 5.0}
    assert defaults(advantages_and_returns) == {"gamma": 1.0, "lam": 0.95}
    assert defaults(ema_update) == {"beta": 0.992}
    assert set(rlhf.__all__) >= {  # the package exports the other steps too
        "AdaptiveKLController", "FixedKLController", "advantages_and_returns", "ema_update", "grpo_advantages",
        "kl_penalized_rewards", "policy_loss", "ptx_loss", "rloo_advantages", "value_loss", "whiten",
    }


# -- what an update did ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", SHAPES)
def test_clip_fraction_and_approx_kl_match_loop(B, T, dtype, seed):
    d = make_batch(B, T, dtype, seed)
    lp, old, adv, mask = d["logprobs"], d["old_logprobs"], d["advantages"], d["mask"]
    clip_ref, kl_ref = loop_update_figures(lp.double(), old.double(), adv.double(), mask, CLIP)
    # A share of the same tokens (one token more or less would be off by 1 / B T), rounded in the input dtype.
    assert float(clip_fraction(lp, old, adv, mask.to(dtype), CLIP)) == pytest.approx(clip_ref, rel=1e-6)
    torch.testing.assert_close(approx_kl(lp, old, mask).double(), torch.tensor(kl_ref, dtype=torch.float64),
                               **TOL[dtype])
    assert kl_ref >= 0 and ((B, T) == (1, 1) or 0 < clip_ref < 1)  # tokens are clipped in the larger batches


def test_clip_fraction_counts_the_tokens_the_loss_clips():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 1.5], [0.5, 1.0, GARBAGE, GARBAGE, GARBAGE]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0], [1.0, 5.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    old = torch.full_like(ratio, -1.0)
    # Clipped: 1.5 with A > 0 and 0.5 with A < 0. Not: 1.1 and 1.0, inside the range, and 0.7 and 0.5 with A > 0
    # and 1.5 with A < 0, which moved against their advantage (the loss keeps their unclipped term).
    assert float(clip_fraction(old + ratio.log(), old, adv, mask, clip_range=0.2)) == pytest.approx(2 / 7, rel=1e-6)
    assert float(approx_kl(old, old, mask)) == 0.0  # the same policy


def test_token_mean_is_the_mean_over_the_response_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, math.nan]], requires_grad=True)
    out = token_mean(x, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert float(out) == 2.5 and not out.requires_grad


# -- bad input ----------------------------------------------------------------------------------

X, M = torch.randn(2, 3), torch.ones(2, 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: policy_loss(torch.randn(6), X, X, M), r"logprobs must be \[B, T\]"),
        (lambda: policy_loss(X, torch.randn(2, 4), X, M), "old_logprobs must have the shape of logprobs"),
        (lambda: policy_loss(X, X, torch.randn(3, 2), M), "advantages must have the shape"),
        (lambda: policy_loss(X, X, X, torch.ones(2, 4)), "mask must have the shape of logprobs"),
        (lambda: policy_loss(X, X, X, M * 0.5), "mask must hold only 0 and 1"),
        (lambda: value_loss(X, X, torch.randn(2), M), "returns must have the shape of values"),
        (lambda: ptx_loss(X, torch.ones(3, 2)), "mask must have the shape"),
        (lambda: kl_penalized_rewards(X, X, torch.randn(2, 1), M), r"scores must be \[B\]"),
        (lambda: kl_penalized_rewards(X, torch.randn(2, 2), torch.randn(2), M), "ref_logprobs must have"),
        (lambda: kl_penalized_rewards(X, X, torch.randn(2), torch.tensor([[1, 1, 0], [0, 0, 0]])), "every row of mask"),
        (lambda: advantages_and_returns(X, torch.randn(2, 4), M), "values must have the shape of rewards"),
        (lambda: whiten(X, torch.tensor([[1, 0, 0], [0, 0, 0]])), "at least two"),
        (lambda: grpo_advantages(torch.randn(4, 1), 2), r"scores must be \[B\]"),
        (lambda: grpo_advantages(torch.randn(4), 3), r"num_generations \(3\) must be >= 1 and divide"),
        (lambda: rloo_advantages(torch.randn(4), 0), "num_generations"),
        (lambda: AdaptiveKLController(0.1, target=0.0, horizon=100), "target"),
        (lambda: ema_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(1)]), "ema_model_params has 1"),
        (lambda: ema_update([torch.zeros(2)], [torch.zeros(3)]), r"ema_model_params\[0\] has shape"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: policy_loss(X, X, X, m),
        lambda m: value_loss(X, X, X, m),
        lambda m: ptx_loss(X, m),
        lambda m: kl_penalized_rewards(X, X, torch.randn(2), m),
        lambda m: advantages_and_returns(X, X, m),
        lambda m: whiten(X, m),
        lambda m: clip_fraction(X, X, X, m),
        lambda m: approx_kl(X, X, m),
        lambda m: token_mean(X, m),
    ],
)
def test_all_zero_mask_is_refused(call):
    with pytest.raises(ValueError, match="all zero"):
        call(torch.zeros(2, 3))
