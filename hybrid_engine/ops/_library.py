"""The compiled ops, loaded on their first call: importing hybrid_engine.ops (so any command's `--help`, the
reference and Triton backends, and every import that calls no kernel) neither compiles them nor waits on a build.

Each op module queues its fake (meta) and autograd implementations here with `fake` and `autograd`; `load()` loads
the library (_build.load: the ahead-of-time build, or the JIT build, once per machine) and registers them, and
`kernels()` is torch.ops.hybrid_engine after that load: the only way the ops package reaches the compiled ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_engine import _build

_fakes: list[tuple[str, Callable]] = []
_autograds: list[tuple[str, Callable, Callable]] = []
_state = {"loaded": False}


def fake(qualname: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is the fake (meta) implementation of op `qualname`, registered when the ops load."""

    def queue(fn: Callable) -> Callable:
        _fakes.append((qualname, fn))
        if _state["loaded"]:
            torch.library.register_fake(qualname, fn)
        return fn

    return queue


def autograd(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """`backward` (with `setup_context`) is op `qualname`'s autograd formula, registered when the ops load."""
    _autograds.append((qualname, backward, setup_context))
    if _state["loaded"]:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing, outside the graph
def load() -> bool:
    """Loads the compiled ops (compiling them on this machine's first use) and registers their fake and autograd
    implementations; a no-op after the first call. Returns True."""
    if not _state["loaded"]:
        _build.load()
        for qualname, fn in _fakes:
            torch.library.register_fake(qualname, fn)
        for qualname, backward, setup_context in _autograds:
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        _state["loaded"] = True
    return True


def kernels():
    """torch.ops.hybrid_engine, loaded."""
    load()
    return torch.ops.hybrid_engine
