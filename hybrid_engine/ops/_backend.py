"""Which implementation an op call runs: the compiled kernels, the Triton kernels or the reference.

"kernels" (the default) runs the C++ CPU kernel on CPU tensors and the CUDA kernel on GPU tensors,
both through torch.ops.hybrid_engine. "triton" runs the Triton kernels (on the CPU only under
TRITON_INTERPRET=1). "reference" runs the pure-torch reference. Set it with the environment
variable HYBRID_ENGINE_BACKEND or `use_backend(...)`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BACKENDS = ("kernels", "triton", "reference")
_backend = os.environ.get("HYBRID_ENGINE_BACKEND", "kernels")
if _backend not in BACKENDS:
    raise ValueError(f"HYBRID_ENGINE_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def get_backend() -> str:
    """The backend op calls run on now."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the op calls inside the block on backend `name` ("kernels", "triton" or "reference")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous
