"""The `hybrid-engine` command: one subcommand per module of this package.

    env       the build environment, the ops, the roofline and dispatch choices (env.py)
    generate  fast generation and its speed against transformers (generate.py)
    bench     benchmark reports (bench.py, report/)
    sft, reward, ppo, train, chat   the RLHF steps (sft.py, reward.py, ppo.py, train.py, chat.py)
    demo-files  example inputs of every kind, from the demo task (demo_files.py)
    plan      per-rank memory of each phase of a run, and whether it fits (plan.py)

This package reads flags and config files, prints summaries and tables, draws plots and writes logs; it calls the
library (hybrid_engine.rlhf, .generation, .engine) and nothing in the library imports it. How the command ends as a
process (a user's mistake in one line, --debug, the exit status, once under torchrun) is process.py.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_engine.commands.bench import add_bench_commands
from hybrid_engine.commands.chat import add_chat_command
from hybrid_engine.commands.demo_files import add_demo_files_command
from hybrid_engine.commands.ds_optimizer import announce_optimizer_build
from hybrid_engine.commands.env import add_env_command
from hybrid_engine.commands.generate import add_generate_command
from hybrid_engine.commands.noise import silence_known_noise
from hybrid_engine.commands.plan import add_plan_command
from hybrid_engine.commands.ppo import add_ppo_command
from hybrid_engine.commands.process import DEBUG_HELP, EXIT_ERROR, EXIT_USAGE, Parser, run
from hybrid_engine.commands.reward import add_reward_command
from hybrid_engine.commands.sft import add_sft_command
from hybrid_engine.commands.train import add_train_command

EPILOG = (f"A mistake in what is given (a flag, a config, a data file) ends the command with one line on stderr and "
          f"exit status {EXIT_USAGE} (a value is wrong) or {EXIT_ERROR} (a file could not be read or written); "
          "--debug, before or after the command's name, shows the traceback instead.")
LOCAL_RANK_HELP = ("this process's rank on its node, which the deepspeed launcher passes before the command's name "
                   "(and as LOCAL_RANK in the environment); accepted and otherwise unused")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hybrid-engine", epilog=EPILOG, description="Fast, affordable RLHF: kernels, generation, "
                    "the hybrid engine and the SFT -> reward model -> PPO/GRPO/RLOO pipeline.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--local_rank", "--local-rank", type=int, metavar="N", help=LOCAL_RANK_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    add_env_command(sub)
    add_generate_command(sub)
    add_bench_commands(sub)
    add_sft_command(sub)
    add_reward_command(sub)
    add_ppo_command(sub)
    add_train_command(sub)
    add_chat_command(sub)
    add_demo_files_command(sub)
    add_plan_command(sub)
    add_debug_flags(sub)
    return parser


def add_debug_flags(sub: argparse._SubParsersAction) -> None:
    """--debug after any command's name too (`hybrid-engine sft ... --debug`), not only before it."""
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                add_debug_flags(action)


def main(argv: list[str] | None = None) -> int:
    """The `hybrid-engine` command. Run as the program (argv None: the process's own arguments), a user's mistake
    ends it with one line and an exit status (process.py); called with argv, as tests and scripts do, exceptions
    reach the caller."""
    args = build_parser().parse_args(argv)
    if argv is not None:
        return run_command(args)
    return run(run_command, args, f"hybrid-engine {args.command}")


def run_command(args: argparse.Namespace) -> int:
    """The parsed command, after what every command does first: the known library noise silenced (noise.py) and a
    DeepSpeed op compile announced (ds_optimizer.py)."""
    silence_known_noise()
    announce_optimizer_build(getattr(args, "ds_config", None))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
