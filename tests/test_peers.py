"""The heartbeat that names a stopped rank (engine/peers.py), on an in-process store: a rank whose counter stops is
named with where it ran, ranks that beat are not, and a store that no longer answers is said to be gone."""

import threading

import pytest
import torch.distributed as dist

from hybrid_engine.engine import peers


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setattr(peers, "HEARTBEAT_S", 0.02)
    store = dist.HashStore()
    for rank in range(3):
        store.set(f"{peers.WHERE}{rank}", f"node {rank}, host h{rank}, pid {100 + rank}")
        store.add(f"{peers.BEAT}{rank}", 1)
    return store


def beating(store, ranks):
    """Heartbeat threads for `ranks`, stopped at the end of the with block."""
    stop = threading.Event()
    threads = [threading.Thread(target=peers._beat, args=(store, f"{peers.BEAT}{r}", stop)) for r in ranks]
    for t in threads:
        t.start()
    return stop, threads


def test_a_rank_whose_heartbeat_stopped_is_named(store, monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "0")
    stop, threads = beating(store, [0, 2])  # rank 1 beat once, then stopped
    try:
        line = peers.stopped_line(store, rank=0, world=3, wait_s=0.3)
    finally:
        stop.set()
        [t.join() for t in threads]
    assert line == ("hybrid_engine: rank 0 (node 0) ended on the error above after rank 1 (node 1, host h1, pid 101) "
                    "stopped (no heartbeat for 0.3 s): the first failure is there, and its node's output says why "
                    "(torchrun's names the exit code or signal)")


def test_nothing_is_said_while_every_other_rank_beats(store):
    stop, threads = beating(store, [1, 2])  # rank 0, the one asking, need not beat
    try:
        assert peers.stopped_line(store, rank=0, world=3, wait_s=0.3) is None
    finally:
        stop.set()
        [t.join() for t in threads]


class GoneStore:
    def set_timeout(self, timeout):
        pass

    def add(self, key, value):
        raise ConnectionResetError("Connection reset by peer")


def test_a_store_that_no_longer_answers_is_said_to_be_gone(monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "1")
    line = peers.stopped_line(GoneStore(), rank=1, world=2, wait_s=0.0)
    assert line.startswith("hybrid_engine: rank 1 (node 1) ended on the error above, and the run's store no longer "
                           "answers (ConnectionResetError): the process holding it")


def test_the_node_is_the_launchers(monkeypatch):
    for name in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    assert peers.node_rank() == "?"
    monkeypatch.setenv("SLURM_NODEID", "3")
    assert peers.node_rank() == "3"
    monkeypatch.setenv("CROSS_RANK", "2")  # the deepspeed launcher's
    assert peers.node_rank() == "2"
    monkeypatch.setenv("GROUP_RANK", "1")  # torchrun's
    assert peers.node_rank() == "1"


def test_a_world_of_one_starts_no_heartbeat():
    peers.watch()  # no process group here
    assert peers._state["store"] is None


def test_the_heartbeat_ends_when_stopped(store):
    stop, (thread,) = beating(store, [0])
    peers._stop(stop, thread)
    assert not thread.is_alive()
