"""The generation-mode transformer: architecture spec, weight conversion, KV cache, prefill/decode."""

from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.spec import SUPPORTED, ModelSpec, spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import Weights, extract_weights

__all__ = [
    "SUPPORTED",
    "InferenceTransformer",
    "KVCache",
    "ModelSpec",
    "Weights",
    "extract_weights",
    "spec_from_config",
]
