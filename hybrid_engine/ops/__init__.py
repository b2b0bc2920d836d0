"""The Python face of every hybrid_engine kernel: the only caller of torch.ops.hybrid_engine.

Importing this package loads the compiled ops (compiling them on first use) and registers their
fake (meta) and autograd implementations. Each function runs on the backend chosen with
`use_backend` ("kernels", "triton" or "reference"); `<op>_reference` is the pure-torch oracle.
"""

from hybrid_engine._build import load as _load

_load()

from hybrid_engine.ops._backend import get_backend, use_backend  # noqa: E402
from hybrid_engine.ops.gae import gae, gae_reference  # noqa: E402
from hybrid_engine.ops.logprobs import token_logprobs, token_logprobs_reference  # noqa: E402

__all__ = [
    "gae",
    "gae_reference",
    "get_backend",
    "token_logprobs",
    "token_logprobs_reference",
    "use_backend",
]
