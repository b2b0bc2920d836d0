"""Which rank of a run stopped, said by the ranks still running: a heartbeat per rank in torch.distributed's store.

A rank killed on one node (a signal, the OOM killer, the node lost) shows on the other nodes only as a collective that
fails ("Connection reset by peer", "Connection closed by peer") or waits for its timeout, and the torchrun of such a
node reports its own rank as the first failure. So, once the process group of a world of several exists (watch), every
rank adds 1 to its counter `hybrid_engine/heartbeat/<rank>` in the group's store every HEARTBEAT_S from a daemon
thread, beside where it runs (`hybrid_engine/where/<rank>`: node, host and pid). A rank that ends on an exception
(sys.excepthook, after the traceback) reads the counters twice, STOPPED_AFTER_S apart, and prints one line naming the
ranks whose counter did not move, or saying that the store itself no longer answers (the process holding it, on
node 0 or the rendezvous endpoint, has ended). Where every rank still beats, it prints nothing. The store's client is
thread-safe (TCPStore serialises its operations), so the beats go through the process group's own.
"""

from __future__ import annotations

import atexit
import functools
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

HEARTBEAT_S = 1.0
STOPPED_AFTER_S = 3.0  # three beats missed: stopped, not merely slow
STORE_TIMEOUT_S = 10.0  # how long the excepthook waits on the store before calling it gone
STOP_WAIT_S = 5.0  # how long the process's exit waits for the heartbeat to end
BEAT = "hybrid_engine/heartbeat/"
WHERE = "hybrid_engine/where/"
_state: dict = {"store": None, "rank": 0, "world": 1}


def node_rank() -> str:
    """This process's node as its launcher numbers them: torchrun's GROUP_RANK, the deepspeed launcher's CROSS_RANK,
    Slurm's SLURM_NODEID; "?" where none is set."""
    for name in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return os.environ[name]
    return "?"


def _beat(store, key: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            store.add(key, 1)
        except Exception:  # the store is gone (its process ended): the excepthook says so if this rank fails
            return


def _stop(stop: threading.Event, thread: threading.Thread) -> None:
    """Ends the heartbeat before the interpreter finalizes: a daemon thread still inside the store's C++ call then
    would be ended mid-call."""
    stop.set()
    thread.join(timeout=STOP_WAIT_S)


def watch() -> None:
    """Starts this rank's heartbeat and the excepthook that names stopped ranks; once per process, and nothing
    without a process group or in a world of one."""
    if _state["store"] is not None or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    store, rank = distributed_c10d._get_default_store(), dist.get_rank()
    store.set(f"{WHERE}{rank}", f"node {node_rank()}, host {socket.gethostname()}, pid {os.getpid()}")
    store.add(f"{BEAT}{rank}", 1)
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(store, f"{BEAT}{rank}", stop), daemon=True,
                              name="hybrid_engine heartbeat")
    thread.start()
    atexit.register(_stop, stop, thread)
    _state.update(store=store, rank=rank, world=dist.get_world_size())
    sys.excepthook = functools.partial(_excepthook, previous=sys.excepthook)


def beats(store, world: int) -> list[int]:
    """Every rank's heartbeat count (a store that does not answer raises)."""
    return [int(store.add(f"{BEAT}{r}", 0)) for r in range(world)]


def stopped_line(store, rank: int, world: int, wait_s: float = STOPPED_AFTER_S) -> str | None:
    """The line naming the ranks whose heartbeat did not move in wait_s (None: every rank beats)."""
    me = f"hybrid_engine: rank {rank} (node {node_rank()}) ended on the error above"
    try:
        store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        before = beats(store, world)
        time.sleep(wait_s)
        after = beats(store, world)
        stopped = [r for r in range(world) if r != rank and after[r] == before[r]]
        where = {r: store.get(f"{WHERE}{r}").decode() for r in stopped}
    except Exception as error:
        return (f"{me}, and the run's store no longer answers ({type(error).__name__}): the process holding it "
                f"(torchrun's agent on node 0 or at the rendezvous endpoint, or rank 0 under the deepspeed launcher) "
                f"has ended; that node's output says why")
    if not stopped:
        return None
    named = "; ".join(f"rank {r} ({where[r]})" for r in stopped)
    return (f"{me} after {named} stopped (no heartbeat for {wait_s:g} s): the first failure is there, and its "
            f"node's output says why (torchrun's names the exit code or signal)")


def _excepthook(kind, error, tb, previous) -> None:
    previous(kind, error, tb)
    line = stopped_line(_state["store"], _state["rank"], _state["world"])
    if line:
        print(line, file=sys.stderr, flush=True)
