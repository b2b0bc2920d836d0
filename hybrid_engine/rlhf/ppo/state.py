"""A PPO run's checkpoint (loop.RunState): everything train_ppo needs to go on as if it had never stopped.

Tensors: the actor's and the critic's weights and optimizer states (under ZeRO 1-3, each rank's partition in its
own file), the EMA, torch's RNG and the actor's sampling generator (each rank's own when distributed). JSON: the
config it ran with, its layout (world size, ZeRO stage, LoRA) and fingerprints of its data, models and reward
functions (a resumed run must use the same), the step records and evaluations so far, the KL controller's
coefficient and the pre-training data's position (and, for reading, the skip count and where the old log-probs came
from). The prompt order needs no state: it is a function of (seed, epoch), and the step count says where it was.
"""

from __future__ import annotations

from hybrid_engine.rlhf import checkpoint as ckpt
from hybrid_engine.rlhf.loop import LoopRecord, evals_json
from hybrid_engine.rlhf.ppo.config import PolicyEval, saved_config
from hybrid_engine.rlhf.train_state import Trained, restore_training, snapshot


class PPORunState:
    """The checkpoint of a run over `run` (driver.PPORun: its config, models, EMA, KL controller and PTX data)."""

    def __init__(self, run, defines: dict | None = None):
        """defines: what defines the run beside its config (checkpoint.RUN_PARTS), compared on resume."""
        self.run, self.defines = run, defines or {}
        self.layout = ckpt.run_layout(run.config, self._trained(), run.models.actor.zero_stage)

    def _trained(self) -> Trained:
        models = self.run.models
        out = [("actor", models.actor.module, models.actor.optimizer)]
        if models.critic is not None:
            out.append(("critic", models.critic_model, models.critic.optimizer))
        return out

    def _generators(self) -> dict:
        return {"actor_sampler": self.run.models.actor.generator}

    def save(self, record: LoopRecord) -> None:
        """Writes checkpoints/step-<record.steps> under config.output_dir (every rank calls this)."""
        run = self.run
        snap = snapshot(self._trained(), self._generators(), self.layout["adapters_only"])
        if run.ema is not None:
            snap.shared.update(run.ema.state_tensors())
        state = {"config": ckpt.config_json(run.config), "run": self.defines, "layout": self.layout,
                 "optimizers": snap.optimizers}
        own = {"history": record.history, "evals": evals_json(record.evals),
               "skipped": sum(r["skipped"] for r in record.history),
               "logprob_source": record.history[-1]["logprob_source"] if record.history else "",
               "kl_coef": run.kl_ctl.value, "ptx": None if run.ptx is None else [run.ptx.epoch, run.ptx.taken]}
        ckpt.save_snapshot(run.config, record.steps, snap, state, own)

    def restore(self, resume: bool | str, record: LoopRecord) -> None:
        """Loads the checkpoint `resume` names (True: the newest under config.output_dir) into the run."""
        run = self.run
        tensors, state = ckpt.load_checkpoint(ckpt.resume_path(run.config, resume), self.layout)
        ckpt.check_same_config(saved_config(state["config"]), run.config, ckpt.saved_world(state))
        ckpt.check_same_run(state.get("run"), self.defines)
        restore_training(self._trained(), tensors, state, self._generators())
        if run.ema is not None:
            run.ema.load_state_tensors(tensors)
        run.kl_ctl.value = state["kl_coef"]
        if run.ptx is not None:
            run.ptx.epoch, run.ptx.taken = state["ptx"]
        record.history, record.steps = state["history"], state["step"]
        record.evals = [(step, None if e is None else PolicyEval(**e)) for step, e in state["evals"]]
