"""Generation mode: sampling and the generate() loop over the KV-cache transformer."""

from hybrid_engine.generation.generate import GenerationOutput, generate, generate_with
from hybrid_engine.generation.sampling import SamplingConfig, SamplingParams

__all__ = ["GenerationOutput", "SamplingConfig", "SamplingParams", "generate", "generate_with"]
