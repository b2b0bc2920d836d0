"""How many threads a generate() call runs on: on a shared CPU, fewer than torch's count when other processes keep
cores busy, restored on return.

Our kernels and torch's run each op as one OpenMP parallel region whose threads meet at a barrier. With more
runnable threads than cores, every barrier waits for a thread the scheduler has set aside, once per op, hundreds of
times per decode step (docs/generation.md, "Shared CPU", has the measured cost). So threads="auto" (the default)
counts, at the start of each call, the runnable threads of other processes (/proc/stat's procs_running less this
process's own running threads; the fewest of up to 3 readings a millisecond apart, so a burst does not count, and
one reading where it finds none) and runs on the cores they leave free: threads_for(cores, torch's count, others).
torch.set_num_threads is set for the call only and restored on return, even on an exception; an int N runs on N
threads; "torch" keeps torch's count. The choice is logged (INFO) when it differs from the last one logged.

procs_running counts the whole machine (or VM) the kernel sees: in a container sharing a larger host it counts the
host's threads, so pass threads=N there (or set HYBRID_ENGINE_GENERATION_THREADS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "HYBRID_ENGINE_GENERATION_THREADS"
"""The default of generate()'s threads= where the call gives none: "auto", "torch" or a thread count."""
SAMPLES = 3
"""Readings of the load per call; the fewest other runnable threads among them counts."""
SAMPLE_GAP_S = 0.001
_last_logged: dict = {"choice": None}


def threads_for(cores: int, requested: int, others: int) -> int:
    """The threads to run on: torch's `requested` count, but no more than the `cores` this process may use less the
    `others` runnable threads of other processes, and at least 1."""
    return max(1, min(requested, cores - others))


def parse_threads(value: int | str | None) -> int | str:
    """generate()'s threads= as "auto", "torch" or an int >= 1; None reads HYBRID_ENGINE_GENERATION_THREADS
    (unset: "auto"). ValueError naming the setting otherwise."""
    source = "threads"
    if value is None:
        source, value = ENV, os.environ.get(ENV, "auto")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value in ("auto", "torch") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"{source} must be 'auto', 'torch' or a thread count >= 1, got {value!r}")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def running_total(stat: Path = Path("/proc/stat")) -> int | None:
    """The machine's runnable threads now (procs_running, this one included); None where /proc/stat has none."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def running_here(tasks: Path = Path("/proc/self/task")) -> int:
    """This process's threads in state R (running or runnable) now, the calling one included."""
    count = 0
    for task in tasks.iterdir():
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended while listed
        count += state == "R"
    return max(count, 1)


def others_running() -> int | None:
    """The runnable threads of other processes: the fewest of up to SAMPLES readings (one where it reads 0, as on a
    quiet machine); None where the load is unknown."""
    fewest = None
    for i in range(SAMPLES):
        if i:
            time.sleep(SAMPLE_GAP_S)
        total = running_total()
        if total is None:
            return None
        others = max(0, total - running_here())
        fewest = others if fewest is None else min(fewest, others)
        if fewest == 0:
            break
    return fewest


def choose(setting: int | str) -> tuple[int, str]:
    """(threads, why) for a parsed setting, reading the load for "auto"."""
    requested = torch.get_num_threads()
    if setting == "torch":
        return requested, f"threads='torch': torch's {requested}"
    if isinstance(setting, int):
        return setting, f"threads={setting}"
    others, cores = others_running(), usable_cores()
    if others is None:
        return requested, f"threads='auto': no /proc/stat procs_running here, so torch's {requested}"
    n = threads_for(cores, requested, others)
    return n, f"threads='auto': {others} runnable threads of other processes on {cores} cores, torch's {requested}"


@contextlib.contextmanager
def generation_threads(setting: int | str | None) -> Iterator[int]:
    """Runs the body on the threads `setting` picks (parse_threads, choose) and restores torch's count after it,
    even on an exception; yields the count."""
    setting = parse_threads(setting)
    before = torch.get_num_threads()
    n, why = choose(setting)
    if setting != "torch" and (n, before) != _last_logged["choice"]:  # "torch" changes nothing: not logged
        _last_logged["choice"] = (n, before)
        log.info("generation runs on %d threads (%s)", n, why)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
