"""A PPO run's checkpoint: everything train_ppo needs to go on as if it had never stopped.

Tensors: the actor's and the critic's weights and optimizer states, the EMA, torch's RNG and the actor's
sampling generator. JSON: the config it ran with (a resumed run must use the same), the step records and
evaluations so far, the skip count, the KL controller's coefficient and the pre-training data's position.
The prompt order needs no state: it is a function of (seed, epoch), and the step count says where it was.
"""

from __future__ import annotations

from hybrid_engine.rlhf import checkpoint as ckpt
from hybrid_engine.rlhf import loop


def _trained(models) -> ckpt.Trained:
    out = [("actor", models.actor.module, models.actor.optimizer)]
    if models.critic is not None:
        out.append(("critic", models.critic_model, models.critic.optimizer))
    return out


def save_run(config, models, ema, kl_ctl, ptx, result) -> None:
    """Writes checkpoints/step-<result.steps> under config.output_dir (every rank calls this)."""
    tensors, optim_meta = ckpt.training_tensors(_trained(models), {"actor_sampler": models.actor.generator})
    if ema is not None:
        tensors.update(ema.state_tensors())
    state = {"config": ckpt.config_json(config), "optimizers": optim_meta, "history": result.history,
             "evals": loop.evals_json(result.evals),
             "skipped": result.skipped, "logprob_source": result.logprob_source, "kl_coef": kl_ctl.value,
             "ptx": None if ptx is None else [ptx.epoch, ptx.taken]}
    ckpt.save_checkpoint(config.output_dir, result.steps, tensors, state, config.keep_checkpoints)


def restore_run(path, config, models, ema, kl_ctl, ptx, result, eval_type) -> None:
    """Loads the checkpoint at `path` (a step folder, or the newest under an output directory) into the run."""
    tensors, state = ckpt.load_checkpoint(path)
    ckpt.check_same_config(state["config"], config)
    ckpt.restore_training(_trained(models), tensors, state["optimizers"], {"actor_sampler": models.actor.generator})
    if ema is not None:
        ema.load_state_tensors(tensors)
    kl_ctl.value = state["kl_coef"]
    if ptx is not None:
        ptx.epoch, ptx.taken = state["ptx"]
    result.history = state["history"]
    result.evals = [(step, None if e is None else eval_type(**e)) for step, e in state["evals"]]
    result.skipped, result.logprob_source = state["skipped"], state["logprob_source"]
    result.steps = state["step"]
