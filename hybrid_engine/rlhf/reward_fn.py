"""Rule-based rewards given as `module:function` (TRL's reward_funcs convention for plain functions).

The function is called once per rollout batch as fn(prompts=[...], completions=[...], completion_ids=[...],
**fields), where fields are the prompt rows' other columns (one list each, aligned with the completions), and returns
one number per completion; conversational prompts (lists of messages) come with completions as one assistant message
each, and an `async def` function is awaited: the arguments of TRL's GRPOTrainer. `module` is an importable module
(`my_pkg.rewards`) or a path to a .py file.

call_with_timeout runs a function in the training process (a user's function may hold models and closures) in a
daemon thread waited for up to a timeout: one that does not return in time raises RewardTimeout and is left running
in the background (Python cannot stop a thread), its result discarded; being a daemon, it does not keep the process
from exiting. Every rank calls it on its own share under torchrun.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import threading
from collections.abc import Callable
from pathlib import Path

import torch


class RewardTimeout(TimeoutError):
    """A reward or eval function did not return within its timeout (PPOConfig.reward_timeout)."""


def _import(module: str, spec: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {module}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {module!r} ({e})") from None


def load_reward_fn(spec: str | Callable) -> Callable:
    """The callable named by `spec` ("module:function", "path/to/file.py:function", or TRL's dotted import path
    "package.module.function"); a callable as is."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and "/" in spec and ":" not in spec and not spec.endswith(".py"):
        raise ValueError(f"reward function {spec!r} reads as a model's name or folder, not a function (TRL's "
                         "reward_funcs may name a reward model): give it as the reward model (--reward-model)")
    dotted = isinstance(spec, str) and ":" not in spec and "." in spec.strip(".") and not spec.endswith(".py")
    if not isinstance(spec, str) or (":" not in spec and not dotted):
        raise ValueError(f"a reward function is given as 'module:function', 'file.py:function' or "
                         f"'package.module.function', got {spec!r}")
    module, _, name = spec.rpartition("." if dotted else ":")
    if not module or not name.isidentifier():
        raise ValueError(f"a reward function is given as 'module:function', 'file.py:function' or "
                         f"'package.module.function', got {spec!r}: "
                         + ("the module or file before ':' is missing" if not module else
                            f"{name!r} after ':' is not a function name"))
    fn = getattr(_import(module, spec), name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module} has no function {name!r}")
    return fn


def takes(fn: Callable, name: str) -> bool:
    """Whether fn accepts a keyword argument `name` (by that name, or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it does
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


def _run_async(fn: Callable, **kwargs):
    return asyncio.run(fn(**kwargs))


def call_with_timeout(fn: Callable, timeout: float | None, kwargs: dict):
    """fn(**kwargs) (an `async def` fn run to its end on an event loop of its own), with torch's grad mode of the
    caller, waited for up to `timeout` seconds (None: as long as it takes); RewardTimeout when it has not returned by
    then (the call goes on in a daemon thread, its result discarded). An exception of fn is raised here."""
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.iscoroutinefunction(fn):
        fn = functools.partial(_run_async, fn)
    if timeout is None:
        return fn(**kwargs)
    grad, box = torch.is_grad_enabled(), {}

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn(**kwargs)
        except BaseException as e:  # raised again in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name=f"reward-fn {name:.40}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardTimeout(f"{name} did not return within {timeout:g} s "
                            "(reward_timeout); it is left running in the background and its result discarded")
    if "error" in box:
        raise box["error"]
    return box["value"]
