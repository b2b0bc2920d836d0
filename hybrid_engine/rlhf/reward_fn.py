"""Rule-based rewards given as `module:function` (TRL's reward_funcs convention for plain functions).

The function is called once per rollout batch as fn(prompts=[...], completions=[...], **fields), where
fields are the prompt rows' other columns (one list each, aligned with the completions), and returns one
number per completion. `module` is an importable module (`my_pkg.rewards`) or a path to a .py file.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path


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
    """The callable named by `spec` ("module:function" or "path/to/file.py:function"); a callable as is."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"a reward function is given as 'module:function' or 'file.py:function', got {spec!r}")
    module, _, name = spec.rpartition(":")
    if not module or not name.isidentifier():
        raise ValueError(f"a reward function is given as 'module:function' or 'file.py:function', got {spec!r}: "
                         + ("the module or file before ':' is missing" if not module else
                            f"{name!r} after ':' is not a function name"))
    fn = getattr(_import(module, spec), name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module} has no function {name!r}")
    return fn
