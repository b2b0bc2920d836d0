"""hybrid_engine.keep_freed_memory: after it, a large tensor freed and allocated again reuses the process's memory
instead of being page-faulted in afresh (run in a process of its own: the setting is process-wide)."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import hybrid_engine
if sys.argv[1] == "keep":
    assert hybrid_engine.keep_freed_memory() and hybrid_engine.keep_freed_memory()  # twice: a no-op
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(48 << 20, dtype=torch.uint8).fill_(1)  # fits in the freed block (an aligned 64 MiB would not, quite)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_tensor_is_reused_without_page_faults():
    pages = (48 << 20) // 4096
    assert _faults("default") > pages // 2  # malloc's default: a fresh mmap, every page faulted again
    assert _faults("keep") < pages // 100  # the heap's freed block, already resident
