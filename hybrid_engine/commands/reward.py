"""`hybrid-engine reward`: step 2, the reward model, from flags and a config file, then its summary.

    hybrid-engine reward --model out/sft --demo --output out/reward   # the built-in demo task
    hybrid-engine reward --model DIR --data pairs.jsonl --output out/reward

Each --data file is the reward step's alone unless --data-split gives it a share (`train` splits its files 2,4,4).
Writes to the output directory: the model and its tokenizer, summary.json, metrics.jsonl (each step's loss and
learning rate, written when training ends) and what --report-to's trackers write (tensorboard/ by default).
"""

from __future__ import annotations

import argparse
import dataclasses

from hybrid_engine.commands import trackers
from hybrid_engine.commands.common import (
    add_training_args,
    before_after,
    claim,
    model_and_tokenizer,
    preflight,
    quiet_libraries,
    report,
    step_config,
    step_data,
)
from hybrid_engine.commands.metrics import log_losses
from hybrid_engine.rlhf.loop import evals_json
from hybrid_engine.rlhf.reward import RewardConfig, train_reward
from hybrid_engine.rlhf.step_config import config_dict


def add_reward_command(subparsers) -> None:
    reward = subparsers.add_parser("reward", help="step 2: train a reward model on (prompt, chosen, rejected) pairs",
                                   description="Train a reward model (the LM body and a scalar value head) on "
                                   "the preference pairs of --data (or of the demo task with --demo); by default "
                                   "from a fresh demo model.")
    add_training_args(reward, "reward", RewardConfig)
    reward.set_defaults(func=run_reward)


def run_reward(args: argparse.Namespace) -> int:
    """`hybrid-engine reward`: train_reward with the flags' settings, then the summary."""
    quiet_libraries()
    config = step_config(args, RewardConfig, "reward")
    reporting = trackers.reporting(args, config.output_dir)
    with claim(args, config.output_dir, model=args.model):  # one run in --output at a time
        return _run(args, config, reporting)


def _run(args: argparse.Namespace, config: RewardConfig, reporting: trackers.Reporting) -> int:
    data = step_data(args, "reward", config.seed)  # every row checked before the model loads
    model, tokenizer = model_and_tokenizer(args, config.seed, reward_ok=True, data=data)
    preflight({"reward": config}, {"reward": data}, tokenizer, model, args.ds_config)  # before any work
    result = train_reward(model, tokenizer, data, config, ds_config=args.ds_config, progress=not args.no_progress,
                          resume=args.resume)
    before, after, losses = result.before, result.after, result.losses

    def held_out(name: str) -> str:
        return before_after(getattr(before, name, None), getattr(after, name, None))

    rows = [("steps", f"{result.steps} ({result.skipped} updates skipped for NaN/inf)"),
            ("stopped by", result.stop_reason),
            ("train loss", before_after(losses[0] if losses else None, losses[-1] if losses else None)),
            ("held-out accuracy", held_out("accuracy")),
            ("held-out chosen mean", held_out("chosen_mean")),
            ("held-out rejected mean", held_out("rejected_mean")),
            ("held-out loss", held_out("loss")),
            ("wall time", f"{result.wall_s:.1f} s ({result.train_s:.1f} s training)"),
            ("prompts truncated / dropped", f"{result.token_stats.prompts_truncated} / "
                                            f"{result.token_stats.prompts_dropped}")]
    evals = evals_json(result.evals)
    figures = {"steps": result.steps, "skipped": result.skipped, "stop_reason": result.stop_reason,
               "losses": losses, "lrs": result.lrs, "before": evals[0][1], "after": evals[-1][1], "evals": evals,
               "train_s": result.train_s, "wall_s": result.wall_s,
               "token_stats": dataclasses.asdict(result.token_stats)}
    log_losses(config.output_dir, "reward", result, reporting, config_dict(config))  # metrics.jsonl, the trackers
    report("reward", args, config, data, rows, figures)
    return 0

