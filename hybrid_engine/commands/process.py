"""How the `hybrid-engine` command ends as a process (main.py runs each subcommand through `run`).

A user's mistake (a bad flag value, a missing field, a refused config, a file that is not there) is one line on
stderr and a non-zero exit status, not a traceback: 2 where a value given is wrong (as argparse's own errors), 1 where
a file could not be read or written. --debug, or an error that is not a user's mistake (a bug), keeps the traceback.

Under torchrun or the deepspeed launcher every rank runs the command and usually fails the same way: the first rank
prints the line; any other rank waits OTHER_RANKS_WAIT_S first, and the launcher, seeing the first rank end, stops
it before it prints. A rank that fails alone prints after the wait and ends, and the launcher then stops the ranks
left waiting for it in a collective: nothing hangs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hybrid_engine.rlhf.step_config import NonFiniteError

PACKAGE = Path(__file__).resolve().parents[1]  # hybrid_engine/: the code whose checks say in one line what is wrong
EXIT_USAGE = 2  # a value given is wrong: a flag, a config key or value, a data file's contents
EXIT_ERROR = 1  # a file could not be read or written
OTHER_RANKS_WAIT_S = 5.0
DEBUG_HELP = "on an error, show Python's full traceback instead of the one-line message"


def _rank() -> int:
    """This process's rank among the launcher's (torchrun and the deepspeed launcher set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0"))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are printed by the first rank only (every rank gets the same flags, so
    every rank would print the same lines)."""

    def error(self, message: str):
        if _rank() != 0:
            self.exit(EXIT_USAGE)
        super().error(message)


def _raised_by_us(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is hybrid_engine's own code (not torch's, not a user's
    --reward-fn)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def user_error_status(error: BaseException) -> int | None:
    """The exit status for an error that is a user's mistake; None for any other (a bug, shown with its traceback).

    A user's mistake: a ValueError from our own checks (each names the flag, file, row or setting and what was
    expected), an OSError about a file (it names the file; a reward function's RewardTimeout is one too), or a
    NonFiniteError (a run that met NaN or inf under nonfinite='stop', or skipped every update: it names the step)."""
    if isinstance(error, OSError) and (error.filename is not None or _raised_by_us(error)):
        return EXIT_ERROR
    if isinstance(error, NonFiniteError) and _raised_by_us(error):
        return EXIT_ERROR
    if isinstance(error, ValueError) and _raised_by_us(error):
        return EXIT_USAGE
    return None


def say_once(line: str) -> None:
    """Prints `line` on stderr: at once on the first rank, after OTHER_RANKS_WAIT_S on any other (see above)."""
    rank = _rank()
    if rank != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
        line = f"(rank {rank}) {line}"
    print(line, file=sys.stderr, flush=True)


def run(func, args: argparse.Namespace, prog: str) -> int:
    """func(args)'s exit status; a user's mistake (user_error_status) ends it with one line instead of a
    traceback, unless args.debug."""
    try:
        return func(args)
    except Exception as error:
        status = None if getattr(args, "debug", False) else user_error_status(error)
        if status is None:
            raise
        say_once(f"{prog}: error: {error}")
        return status
