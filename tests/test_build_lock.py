"""The JIT build's lock (hybrid_engine/_build_lock.py): a waiting process names the holder, a killed build's lock is
taken over at once, a lock that cannot be checked ages out. No test compiles the ops: they use a lock held by a
process the test starts and kills, or a fake holder."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from hybrid_engine import _build, _build_lock
from hybrid_engine._build_lock import LOCK, TORCH_LOCK, Holder, acquire, is_gone, read_holder


def ended_pid() -> int:
    """The pid of a process that has been started and killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def torch_locking_only(build_directory: str, **_) -> None:
    """cpp_extension.load's locking without its compile: take torch's bare `lock` file or wait for it to go."""
    baton = FileBaton(os.path.join(build_directory, TORCH_LOCK))
    if baton.try_acquire():
        baton.release()
    else:
        baton.wait()


def test_load_takes_over_a_killed_builds_locks_at_once(tmp_path, monkeypatch, capsys):
    """Both locks a build killed half-way leaves (ours with its pid, torch's bare one) used to hold every later
    load for 15 minutes; now the load goes ahead at once and says so."""
    monkeypatch.setenv("HYBRID_ENGINE_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_loaded", False)
    monkeypatch.setattr(_build, "_prebuilt", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", torch_locking_only)
    directory = _build.build_directory()
    pid = ended_pid()
    (directory / LOCK).write_text(f"{pid} {socket.gethostname()}\n")
    (directory / TORCH_LOCK).write_text("")
    loading = threading.Thread(target=_build.load, daemon=True)  # daemon: a load left waiting does not hold pytest
    loading.start()
    loading.join(timeout=20)
    assert not loading.is_alive(), "load() is still waiting on the killed build's lock"
    assert f"took over the C++ ops build lock in {directory} from process {pid}" in capsys.readouterr().err
    assert not (directory / LOCK).exists() and not (directory / TORCH_LOCK).exists()


def test_a_live_holder_is_waited_for_and_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{holder.pid} {socket.gethostname()}\n")
        said = []
        waiter = threading.Thread(target=acquire, args=(tmp_path,), kwargs={"say": said.append})
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive()
        assert len(said) == 1 and said[0].startswith(f"hybrid_engine: waiting for the C++ ops build in {tmp_path}, "
                                                     f"locked by process {holder.pid} (for ")
        assert said[0].endswith("the lock is taken over as soon as that process ends")
    finally:
        holder.kill()
        holder.wait()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert read_holder(tmp_path / LOCK).pid == os.getpid()
    _build_lock.release(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_a_free_directory_is_taken_quietly_and_a_bare_torch_lock_removed(tmp_path):
    said = []
    acquire(tmp_path, say=said.append)
    assert said == [] and read_holder(tmp_path / LOCK).pid == os.getpid()
    _build_lock.release(tmp_path)
    (tmp_path / TORCH_LOCK).write_text("")  # left by a build killed before the lock named its holder
    acquire(tmp_path, say=said.append)
    assert said == [f"hybrid_engine: removed the lock a stopped build left in {tmp_path}"]
    assert not (tmp_path / TORCH_LOCK).exists()


@pytest.mark.parametrize("text", ["", "12345 another-host"])
def test_a_lock_that_cannot_be_checked_ages_out(tmp_path, text):
    """No pid (an older lock) or another host's pid: kept until STALE_AFTER_S old, then taken over."""
    (tmp_path / LOCK).write_text(text)
    assert not is_gone(read_holder(tmp_path / LOCK))
    old = time.time() - _build_lock.STALE_AFTER_S - 5
    os.utime(tmp_path / LOCK, (old, old))
    assert is_gone(read_holder(tmp_path / LOCK))


def test_a_live_process_of_this_host_is_never_aged_out():
    assert not is_gone(Holder(os.getpid(), socket.gethostname(), age_s=10 * _build_lock.STALE_AFTER_S))
    assert is_gone(Holder(ended_pid(), socket.gethostname(), age_s=0.0))

