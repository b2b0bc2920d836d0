"""Generation mode: sampling and the generate() loop over the KV-cache transformer."""

from hybrid_engine.generation.generate import GenerationOutput, generate
from hybrid_engine.generation.sampling import SamplingConfig

__all__ = ["GenerationOutput", "SamplingConfig", "generate"]
