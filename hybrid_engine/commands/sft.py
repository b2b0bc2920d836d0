"""`hybrid-engine sft`: step 1, supervised fine-tuning, from flags and a config file, then its summary.

    hybrid-engine sft --demo --max-steps 200 --output out/sft   # the built-in demo task
    hybrid-engine sft --model DIR --data rows.jsonl --output out/sft

Each --data file is SFT's alone unless --data-split gives it a share (`train` splits its files 2,4,4).
Writes to the output directory: the model and its tokenizer, summary.json, metrics.jsonl (each step's loss and
learning rate, written when training ends) and what --report-to's trackers write (tensorboard/ by default).
"""

from __future__ import annotations

import argparse
import dataclasses

from hybrid_engine.commands import trackers
from hybrid_engine.commands.common import (
    add_lora_args,
    add_training_args,
    before_after,
    claim,
    lora_config,
    model_and_tokenizer,
    preflight,
    quiet_libraries,
    report,
    step_config,
    step_data,
)
from hybrid_engine.commands.metrics import log_losses
from hybrid_engine.rlhf.sft import SFTConfig, train_sft
from hybrid_engine.rlhf.step_config import config_dict


def add_sft_command(subparsers) -> None:
    sft = subparsers.add_parser("sft", help="step 1: supervised fine-tuning on (prompt, response) rows",
                                description="Fine-tune a causal LM on the (prompt, response) rows of --data (or of "
                                "the demo task with --demo), the loss on the response tokens only; by default a "
                                "fresh demo model.")
    add_training_args(sft, "sft", SFTConfig)
    add_lora_args(sft)
    sft.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    """`hybrid-engine sft`: train_sft with the flags' settings, then the summary."""
    quiet_libraries()
    config = step_config(args, SFTConfig, "sft")
    reporting = trackers.reporting(args, config.output_dir)
    with claim(args, config.output_dir, model=args.model):  # one run in --output at a time
        return _run(args, config, reporting)


def _run(args: argparse.Namespace, config: SFTConfig, reporting: trackers.Reporting) -> int:
    lora = lora_config(args)
    data = step_data(args, "sft", config.seed)  # every row checked before the model loads
    model, tokenizer = model_and_tokenizer(args, config.seed, data=data)
    preflight({"sft": config}, {"sft": data}, tokenizer, model, args.ds_config)  # before any work
    result = train_sft(model, tokenizer, data, config, ds_config=args.ds_config, lora=lora,
                       progress=not args.no_progress, resume=args.resume)
    losses, stats = result.losses, result.token_stats
    rows = [("steps", f"{result.steps} ({result.skipped} updates skipped for NaN/inf)"),
            ("stopped by", result.stop_reason),
            ("train loss", before_after(losses[0] if losses else None, losses[-1] if losses else None)),
            ("held-out perplexity", before_after(result.eval_perplexity_before, result.eval_perplexity_after, ".3f")),
            ("training tokens/s", f"{result.tokens_per_s:.0f} (per rank)"),
            ("wall time", f"{result.wall_s:.1f} s ({result.train_s:.1f} s training)"),
            ("prompts truncated / dropped", f"{stats.prompts_truncated} / {stats.prompts_dropped}")]
    figures = {"steps": result.steps, "skipped": result.skipped, "stop_reason": result.stop_reason,
               "losses": losses, "lrs": result.lrs, "eval_perplexity_before": result.eval_perplexity_before,
               "eval_perplexity_after": result.eval_perplexity_after, "evals": result.evals,
               "train_tokens": result.train_tokens, "tokens_per_s": result.tokens_per_s, "train_s": result.train_s,
               "wall_s": result.wall_s, "token_stats": dataclasses.asdict(stats), "lora_r": args.lora_r}
    log_losses(config.output_dir, "sft", result, reporting, config_dict(config))  # metrics.jsonl, the trackers
    report("sft", args, config, data, rows, figures)
    return 0

