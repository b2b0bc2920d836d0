"""The `hybrid-engine` command: one subcommand per module of this package.

    env       the build environment, the ops, the roofline and dispatch choices (env.py)
    generate  fast generation and its speed against transformers (generate.py)
    bench     benchmark reports (bench.py, report/)
    sft, reward, ppo, train, chat   the RLHF steps (sft.py, reward.py, ppo.py, train.py, chat.py)

This package reads flags and config files, prints summaries and tables, draws plots and writes logs; it calls the
library (hybrid_engine.rlhf, .generation, .engine) and nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_engine.commands.bench import add_bench_commands
from hybrid_engine.commands.chat import add_chat_command
from hybrid_engine.commands.env import add_env_command
from hybrid_engine.commands.generate import add_generate_command
from hybrid_engine.commands.noise import silence_known_noise
from hybrid_engine.commands.ppo import add_ppo_command
from hybrid_engine.commands.reward import add_reward_command
from hybrid_engine.commands.sft import add_sft_command
from hybrid_engine.commands.train import add_train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-engine", description="Fast, affordable RLHF: kernels, generation, "
                                     "the hybrid engine and the SFT -> reward model -> PPO/GRPO/RLOO pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_env_command(sub)
    add_generate_command(sub)
    add_bench_commands(sub)
    add_sft_command(sub)
    add_reward_command(sub)
    add_ppo_command(sub)
    add_train_command(sub)
    add_chat_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_known_noise()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
