"""The process's memory allocator, set for training on the CPU.

glibc's malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh mmap and
unmaps it when it is freed. A training step allocates and frees the same large activations and gradients every
step, so the kernel page-faults and zeroes all of them again each time: on a 2-core VM, 16384 faults for a
64 MiB tensor cost more than reading it. keep_freed_memory() makes malloc take every block from its heap and keep
what is freed for the next step (as the jemalloc and tcmalloc that CPU training guides recommend do, without a
preload). The price: the resident size stays at the process's peak instead of falling between steps.

release_freed_memory() is the other way: what the engine calls when it leaves generation mode, to hand the freed
heap back to the OS (malloc_trim). Under keep_freed_memory() it does nothing, so the pages of the generation's
weights and KV cache stay resident for the training step that follows instead of being page-faulted in again.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_applied = False


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and never give freed memory back (glibc's mallopt: M_MMAP_MAX
    0, M_TRIM_THRESHOLD at its largest), for the rest of the process. Blocks allocated before keep their mmap.
    Returns whether it is in force: False where the C library is not glibc. Calling it again does nothing."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def release_freed_memory() -> bool:
    """Hands malloc's freed heap pages back to the OS (glibc's malloc_trim; glibc keeps large freed heap blocks
    otherwise), unless keep_freed_memory() is in force. Returns whether it trimmed."""
    libc = None if _applied else _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc on Linux (mallopt and malloc_trim are glibc's), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")
