"""The PPO maths of the RLHF step (DeepSpeed-Chat's step 3), one small function per formula.

Every [B, T] tensor here is response-aligned: row b holds sequence b's response tokens from
position 0, and `mask` [B, T] (bool, int or float 0/1) marks them, with any padding on the right.
Prompts are not part of these tensors. Positions where mask is 0 never reach a result: they may
hold anything finite or not (they are selected away with `torch.where`, not multiplied by 0), and
every [B, T] output holds 0 there. "Pooled mean" is one token-level mean over the whole batch,
sum(mask * x) / sum(mask), as DeepSpeed-Chat's losses take it.

The defaults are DeepSpeed-Chat's (dschat/rlhf/ppo_trainer.py and main.py): KL coefficient 0.1,
reward clip 5, policy clip range 0.2, value clip range 0.2, gamma 1.0, lambda 0.95, EMA beta 0.992;
the PTX coefficient (27.8) multiplies `ptx_loss` in the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hybrid_engine.ops import gae

# TRL's masked_whiten adds this to the variance before the reciprocal square root.
WHITEN_EPS = 1e-8


# -- argument checks ----------------------------------------------------------------------------


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _response_mask(mask: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Check mask [B, T] against `ref` and return it as bool; refuse values other than 0/1 and no 1 at all."""
    _check_same_shape("mask", mask, ref_name, ref)
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold only 0 and 1")
        mask = mask != 0
    if not mask.any():
        raise ValueError("mask has no response token (all zero): the pooled mean would divide by 0")
    return mask


def _pooled_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mask * x) / sum(mask) for x [B, T] and a bool mask [B, T]; a 0-d tensor."""
    return torch.where(mask, x, 0).sum() / mask.sum()


def _check_groups(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """scores [B] viewed as [B // k, k] groups of k = num_generations consecutive samples of one prompt."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if num_generations < 1 or scores.numel() % num_generations != 0:
        raise ValueError(f"num_generations ({num_generations}) must be >= 1 and divide the batch ({scores.numel()})")
    return scores.reshape(-1, num_generations)


# -- losses -------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] log-probs of the response tokens under the policy being trained
    old_logprobs: torch.Tensor,  # [B, T] the same under the policy that generated them
    advantages: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] 1 on response tokens
    clip_range: float = 0.2,
) -> torch.Tensor:
    """PPO's clipped surrogate loss, a 0-d tensor (DeepSpeed-Chat's `actor_loss_fn`).

    ratio = exp((logprobs - old_logprobs) * mask) (the log-ratio is masked before the exp); per
    token max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)); the pooled mean.
    """
    _check_2d("logprobs", logprobs)
    _check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    _check_same_shape("advantages", advantages, "logprobs", logprobs)
    m = _response_mask(mask, "logprobs", logprobs)
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs, 0))  # [B, T], 1 off the response
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [B, T]
    return _pooled_mean(torch.maximum(unclipped, clipped), m)


def value_loss(
    values: torch.Tensor,  # [B, T] the critic's values now
    old_values: torch.Tensor,  # [B, T] its values at generation time
    returns: torch.Tensor,  # [B, T] targets (from advantages_and_returns)
    mask: torch.Tensor,  # [B, T]
    clip_range: float = 0.2,
) -> torch.Tensor:
    """The clipped value loss, a 0-d tensor (DeepSpeed-Chat's `critic_loss_fn`).

    0.5 * pooled mean of max((v - R)^2, (clip(v, v_old - clip_range, v_old + clip_range) - R)^2).
    """
    _check_2d("values", values)
    _check_same_shape("old_values", old_values, "values", values)
    _check_same_shape("returns", returns, "values", values)
    m = _response_mask(mask, "values", values)
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)  # [B, T]
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)  # [B, T]
    return 0.5 * _pooled_mean(per_token, m)


def ptx_loss(
    logprobs: torch.Tensor,  # [B, T] log-probs of the pre-training (unsupervised) batch's target tokens
    mask: torch.Tensor,  # [B, T] 1 on the tokens the LM loss counts
) -> torch.Tensor:
    """The pre-training-mixture LM loss, a 0-d tensor: the negative pooled mean of the log-probs.

    This is the token-mean cross-entropy an HF causal LM returns as `.loss` for these labels, which
    DeepSpeed-Chat's `train_unsupervised` backpropagates; the trainer multiplies it by the PTX
    coefficient (DeepSpeed-Chat's `unsup_coef`, default 27.8).
    """
    _check_2d("logprobs", logprobs)
    m = _response_mask(mask, "logprobs", logprobs)
    return -_pooled_mean(logprobs, m)


# -- rewards, advantages, returns ---------------------------------------------------------------


def kl_penalized_rewards(
    logprobs: torch.Tensor,  # [B, T] policy log-probs at generation time
    ref_logprobs: torch.Tensor,  # [B, T] reference-model log-probs of the same tokens
    scores: torch.Tensor,  # [B] the reward model's score of each sequence
    mask: torch.Tensor,  # [B, T] 1 on response tokens; each row needs at least one
    kl_coef: float = 0.1,
    clip_reward: float = 5.0,
) -> torch.Tensor:
    """Per-token rewards [B, T] (DeepSpeed-Chat's `compute_rewards`), 0 off the response.

    -kl_coef * (logprobs - ref_logprobs) on every response token, plus the score clipped to
    [-clip_reward, clip_reward] on each sequence's last response token (its last mask-1 position).

    DeepSpeed-Chat puts the score one position later, on the first padding slot after the last
    mask-1 token (`ends = start + mask.sum(1) + 1`; on the last token only when a row has no
    padding), and keeps that slot's KL term and value in its GAE (DeepSpeedExamples PR #672).
    To reproduce its numbers exactly, pass this function and `advantages_and_returns` the mask
    extended by one token to the right (clamped to T); the losses keep the unextended mask.
    """
    _check_2d("logprobs", logprobs)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    B, T = logprobs.shape
    if scores.shape != (B,):
        raise ValueError(f"scores must be [B] = ({B},), one per sequence, got shape {tuple(scores.shape)}")
    m = _response_mask(mask, "logprobs", logprobs)
    if not m.any(dim=1).all():
        raise ValueError("every row of mask needs a response token: the score goes on the last one")
    kl_reward = torch.where(m, -kl_coef * (logprobs - ref_logprobs), 0)  # [B, T]
    positions = torch.arange(T, device=m.device)  # [T]
    last = torch.where(m, positions, -1).amax(dim=1)  # [B] last response position of each row
    is_last = positions[None, :] == last[:, None]  # [B, T]
    score = torch.clamp(scores, -clip_reward, clip_reward).to(kl_reward.dtype)  # [B]
    return kl_reward + torch.where(is_last, score[:, None], 0)


def advantages_and_returns(
    rewards: torch.Tensor,  # [B, T] from kl_penalized_rewards
    values: torch.Tensor,  # [B, T] the critic's values at generation time
    mask: torch.Tensor,  # [B, T] 1 on response tokens, right-padded
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns [B, T] (DeepSpeed-Chat's `get_advantages_and_returns`), both detached.

    The backward recursion runs over each row's response tokens with next value 0 after the last
    one; returns = advantages + values; both are 0 off the response. It runs through the `gae` op,
    which accumulates in fp32: the outputs are fp32, or fp64 (holding fp32-accurate numbers) when
    an input is fp64.

    DeepSpeed-Chat runs the recursion over every position from the response start to T, after
    zeroing rewards and values beyond its `ends`; with zeros there the recursion is 0 beyond the
    end and the next value after the end is 0, which is what the op does with a right-padded mask.
    The op restarts at every 0 in the mask, so a mask with a hole inside a row would make two
    episodes of it where DeepSpeed-Chat makes one: response masks are right-padded, without holes.
    For DeepSpeed-Chat's one-token-late `ends`, see `kl_penalized_rewards`.
    """
    _check_2d("rewards", rewards)
    _check_same_shape("values", values, "rewards", rewards)
    m = _response_mask(mask, "rewards", rewards)
    out_dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    with torch.no_grad():
        # The op takes one float dtype for all three inputs and computes in fp32 whatever it is.
        r, v = rewards.detach().float(), values.detach().float()
        advantages, returns = gae(r, v, m.float(), float(gamma), float(lam))  # [B, T] fp32 each
    return advantages.to(out_dtype), returns.to(out_dtype)


def whiten(
    x: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]; at least two tokens
    shift_mean: bool = True,
) -> torch.Tensor:
    """x whitened with its masked mean and variance over all response tokens, [B, T], 0 off the response.

    (x - mean) / sqrt(var + 1e-8), with var the unbiased (Bessel-corrected, n - 1) variance, as
    TRL's `masked_whiten` / `masked_var(unbiased=True)`, which its PPO uses on advantages before
    setting padding to 0 (DeepSpeed-Chat has no whitening). With shift_mean=False the mean is
    added back, so only the scale changes. Needs at least two response tokens, like TRL.
    """
    _check_2d("x", x)
    m = _response_mask(mask, "x", x)
    n = int(m.sum())
    if n < 2:
        raise ValueError("mask needs at least two response tokens for the unbiased variance")
    mean = _pooled_mean(x, m)  # 0-d
    var = _pooled_mean((x - mean) ** 2, m) * (n / (n - 1))  # 0-d, unbiased
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)  # [B, T]
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0)


# -- group baselines (GRPO, RLOO) ---------------------------------------------------------------


def grpo_advantages(
    scores: torch.Tensor,  # [B] = [num_prompts * num_generations], a prompt's samples consecutive
    num_generations: int,
    eps: float = 1e-4,
    scale: bool = True,
) -> torch.Tensor:
    """Group-normalised advantages [B]: (s - mean_group) / (std_group + eps), or s - mean_group unscaled.

    As TRL 1.16's GRPOTrainer (scale_rewards="group" for scale=True, "none" for False, its
    default multi_objective_aggregation "sum_then_normalize"): groups are consecutive runs of
    num_generations samples, std is the unbiased (n - 1) standard deviation (TRL's `nanstd`) and
    eps = 1e-4 is added to the std, not under the root. With num_generations == 1 the advantages
    are 0, as in TRL. A NaN score (unscorable: no reward applies) is left out of its group's mean
    and std, and its advantage is 0, as TRL's; so is that of a group's only scorable sample when
    scaled (its std is undefined).
    """
    groups = _check_groups(scores, num_generations)  # [P, k]
    if not groups.isnan().any():
        centred = groups - groups.mean(dim=1, keepdim=True)  # [P, k]
        if scale and num_generations > 1:
            centred = centred / (groups.std(dim=1, keepdim=True, correction=1) + eps)
        return centred.reshape(-1)
    centred = groups - groups.nanmean(dim=1, keepdim=True)
    if scale and num_generations > 1:
        centred = centred / (_nanstd(groups) + eps)
    return _nan_to_zero(centred.reshape(-1))


def rloo_advantages(
    scores: torch.Tensor,  # [B] = [num_prompts * num_generations], a prompt's samples consecutive
    num_generations: int,
) -> torch.Tensor:
    """Leave-one-out advantages [B]: s_i minus the mean of the other k - 1 samples of its prompt.

    As TRL 1.16's RLOOTrainer: baseline = (group sum - s_i) / (k - 1) over consecutive groups of
    k = num_generations (older TRL grouped as [k, num_prompts]); 0 when k == 1, as in TRL. Its
    optional `normalize_advantages` and the KL term it folds into the scores are the trainer's.
    A NaN score (unscorable) is left out: the baseline is the mean of the other scorable samples,
    and an unscorable sample, or a group's only scorable one, gets advantage 0, as TRL's.
    """
    groups = _check_groups(scores, num_generations)  # [P, k]
    if num_generations == 1:
        return torch.zeros_like(scores)
    if not groups.isnan().any():
        baseline = (groups.sum(dim=1, keepdim=True) - groups) / (num_generations - 1)  # [P, k]
        return (groups - baseline).reshape(-1)
    count = (~groups.isnan()).sum(dim=1, keepdim=True)  # [P, 1] scorable samples
    baseline = (groups.nansum(dim=1, keepdim=True) - groups) / (count - 1)
    return _nan_to_zero((groups - baseline).reshape(-1))


def _nanstd(groups: torch.Tensor) -> torch.Tensor:
    """[P, 1]: each row's unbiased standard deviation over its non-NaN values (NaN with fewer than two), TRL's
    nanstd."""
    count = (~groups.isnan()).sum(dim=1, keepdim=True)
    squares = ((groups - groups.nanmean(dim=1, keepdim=True)) ** 2).nansum(dim=1, keepdim=True)
    return (squares / (count - 1)).sqrt()


def _nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    """NaN made 0 (inf kept: an infinite score stays a step's non-finite target)."""
    return torch.where(x.isnan(), 0.0, x)


# -- what an actor update did: observations, never trained on -------------------------------------


@torch.no_grad()
def token_mean(
    x: torch.Tensor,  # [B, T] a per-token figure (the policy's entropy, say)
    mask: torch.Tensor,  # [B, T] 1 on response tokens
) -> torch.Tensor:
    """The pooled mean of `x` over the response tokens, a 0-d tensor without gradient."""
    _check_2d("x", x)
    return _pooled_mean(x, _response_mask(mask, "x", x))


@torch.no_grad()
def clip_fraction(
    logprobs: torch.Tensor,  # [B, T] as policy_loss takes them
    old_logprobs: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    clip_range: float = 0.2,
) -> torch.Tensor:
    """The share of response tokens where policy_loss takes the clipped term, so that they add no gradient:
    ratio > 1 + clip_range with a positive advantage, or ratio < 1 - clip_range with a negative one (TRL's
    clipfrac: where the clipped term of the loss exceeds the unclipped); a 0-d tensor in [0, 1]."""
    _check_2d("logprobs", logprobs)
    _check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    _check_same_shape("advantages", advantages, "logprobs", logprobs)
    m = _response_mask(mask, "logprobs", logprobs)
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs, 0))
    clipped = ((ratio > 1.0 + clip_range) & (advantages > 0)) | ((ratio < 1.0 - clip_range) & (advantages < 0))
    return _pooled_mean(clipped.to(ratio.dtype), m)


@torch.no_grad()
def approx_kl(
    logprobs: torch.Tensor,  # [B, T] the policy being trained
    old_logprobs: torch.Tensor,  # [B, T] the policy that sampled the tokens
    mask: torch.Tensor,  # [B, T]
) -> torch.Tensor:
    """KL(old || new) estimated on the sampled tokens: the pooled mean of the k3 estimator (ratio - 1) - log ratio,
    log ratio = logprobs - old_logprobs (Schulman's "Approximating KL divergence": unbiased, and each term >= 0, 0
    where the policies agree); a 0-d tensor."""
    _check_2d("logprobs", logprobs)
    _check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    m = _response_mask(mask, "logprobs", logprobs)
    log_ratio = torch.where(m, logprobs - old_logprobs, 0)
    return _pooled_mean(torch.expm1(log_ratio) - log_ratio, m)


# -- KL coefficient controllers ------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient (DeepSpeed-Chat's `kl_ctl`); `update` leaves it alone."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient (the signature of AdaptiveKLController.update)."""


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019, as lm-human-preferences and TRL's PPO.

    update: proportional_error = clip(current_kl / target - 1, -0.2, 0.2);
    value *= 1 + proportional_error * n_steps / horizon. The coefficient rises while the KL is
    above target and falls while it is below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards holding `current_kl` (a float or 0-d tensor) at target."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# -- EMA -----------------------------------------------------------------------------------------


def ema_update(
    ema_model_params: Iterable[torch.Tensor],  # e.g. ema_model.parameters()
    model_params: Iterable[torch.Tensor],  # e.g. model.parameters(), in the same order
    beta: float = 0.992,
) -> None:
    """ema <- beta * ema + (1 - beta) * param, in place and without grad (DeepSpeed-Chat's `moving_average`).

    Computed as DeepSpeed-Chat does, torch.lerp(param, ema, beta), with param moved to the EMA's
    device and dtype. Under ZeRO-3 the caller gathers both parameter sets around this call.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ema_list, param_list = list(ema_model_params), list(model_params)
    if len(ema_list) != len(param_list):
        raise ValueError(f"ema_model_params has {len(ema_list)} tensors but model_params has {len(param_list)}")
    for i, (ema, param) in enumerate(zip(ema_list, param_list)):
        if ema.shape != param.shape:
            raise ValueError(
                f"ema_model_params[{i}] has shape {tuple(ema.shape)} but model_params[{i}] has {tuple(param.shape)}"
            )
    with torch.no_grad():
        for ema, param in zip(ema_list, param_list):
            ema.copy_(torch.lerp(param.to(device=ema.device, dtype=ema.dtype), ema, beta))
