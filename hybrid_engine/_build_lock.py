"""The JIT build's lock: one process builds the ops in a build directory, the others wait for it and say so.

torch's cpp_extension.load guards a build with a bare `lock` file (FileBaton): it names no holder, a waiter polls it
without a word, and a build killed half-way leaves it behind for every later load to wait on. Around that call we
hold our own lock, `build.lock` in the same directory, holding "PID HOST" of the process building:

- a process that finds it held says so, with the holder's pid, and again every REPEAT_S while it waits;
- a holder on this host that has ended (os.kill(pid, 0) finds no such process) is taken over at once, and with it
  torch's `lock` that it left;
- a lock with no pid, or written on another host (a shared cache directory), is taken over once older than
  STALE_AFTER_S, as it cannot be checked.

Reading the holder and replacing it happen under a flock of `build.lock.guard` (released by the kernel however its
process ends), so two processes taking over the same dead holder do not both get the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK = "build.lock"
GUARD = "build.lock.guard"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton
STALE_AFTER_S = 900.0
POLL_S = 0.2
REPEAT_S = 60.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lock file: its pid and host (None and "" where the file does not say) and the file's age."""

    pid: int | None
    host: str
    age_s: float

    def __str__(self) -> str:
        who = "an unknown process" if self.pid is None else f"process {self.pid}"
        where = f" on host {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"{who}{where} (for {self.age_s:.0f} s)"


def read_holder(path: Path) -> Holder | None:
    """The holder `path` names; None where there is no such file."""
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    pid, _, host = text.strip().partition(" ")
    return Holder(int(pid) if pid.isdigit() else None, host, age)


def checkable(holder: Holder) -> bool:
    """Whether the holder is a process of this host, whose end os.kill(pid, 0) can see."""
    return holder.pid is not None and holder.host == socket.gethostname()


def process_alive(pid) -> bool:
    """Whether process `pid` of this host is running (os.kill(pid, 0); another user's counts as running)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_gone(holder: Holder, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the holder can no longer release its lock: a process of this host that has ended, or a lock that
    cannot be checked (no pid, another host) older than stale_after_s."""
    if not checkable(holder):
        return holder.age_s > stale_after_s
    return not process_alive(holder.pid)


@contextlib.contextmanager
def _guarded(directory: Path) -> Iterator[None]:
    with open(directory / GUARD, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def try_acquire(directory: Path, stale_after_s: float = STALE_AFTER_S) -> tuple[bool, Holder | None]:
    """(True, the gone holder taken over or None) when this process now holds the lock; (False, the live holder)."""
    with _guarded(directory):
        holder = read_holder(directory / LOCK)
        if holder is not None and not is_gone(holder, stale_after_s):
            return False, holder
        (directory / LOCK).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        return True, holder


def release(directory: Path) -> None:
    """Removes the lock if this process holds it."""
    with _guarded(directory):
        holder = read_holder(directory / LOCK)
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            (directory / LOCK).unlink()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def acquire(directory: Path, stale_after_s: float = STALE_AFTER_S, say: Callable[[str], None] = _stderr) -> None:
    """Holds the lock, waiting (and saying so) while a live process holds it; a gone holder is taken over."""
    said = None
    while True:
        acquired, holder = try_acquire(directory, stale_after_s)
        if acquired:
            break
        if said is None or time.monotonic() - said >= REPEAT_S:
            until = "as soon as that process ends" if checkable(holder) else f"at {stale_after_s:.0f} s old"
            say(f"hybrid_engine: {'waiting' if said is None else 'still waiting'} for the C++ ops build in "
                f"{directory}, locked by {holder}; the lock is taken over {until}")
            said = time.monotonic()
        time.sleep(POLL_S)
    if holder is not None:
        why = "which has ended" if checkable(holder) else f"a lock older than {stale_after_s:.0f} s"
        say(f"hybrid_engine: took over the C++ ops build lock in {directory} from {holder}, {why}")
    if (directory / TORCH_LOCK).exists():  # we hold ours: torch's own lock was left by a build that stopped
        (directory / TORCH_LOCK).unlink(missing_ok=True)
        if holder is None:
            say(f"hybrid_engine: removed the lock a stopped build left in {directory}")


@contextlib.contextmanager
def build_lock(directory: Path, stale_after_s: float = STALE_AFTER_S,
               say: Callable[[str], None] = _stderr) -> Iterator[None]:
    """Holds the build lock of `directory` for the body (see the module's docstring)."""
    acquire(directory, stale_after_s, say)
    try:
        yield
    finally:
        release(directory)
