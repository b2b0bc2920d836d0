"""Config fields the generation-mode transformer cannot honour exactly, refused by name so that such a model takes
the HF path (engine/hf_path.py) instead of a silently different answer."""

from __future__ import annotations

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies and attention scaling are fixed when the model is built: the fast path reads them
from the HF model's rotary module (inv_freq, attention_scaling). Dynamic ones ("dynamic", "longrope") change with
the sequence length; any other is unknown to it."""


def check_rope(config) -> None:
    """Refuses, naming the field, a RoPE the fast path does not compute exactly: a type outside STATIC_ROPE, or
    parameters per layer type (transformers 5's nested rope_parameters: one cos/sin table serves every layer here)."""
    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return
    if any(isinstance(value, dict) for value in rope.values()):
        raise ValueError(f"{model_type}: rope_parameters per layer type ({', '.join(rope)}) are not computed by the "
                         "fast path (one RoPE table serves every layer)")
    rope_type = str(rope.get("rope_type", rope.get("type", "default")))
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"{model_type}: rope_parameters['rope_type']={rope_type!r} is not computed by the fast path "
                         f"(it serves {', '.join(STATIC_ROPE)}: their frequencies do not change with the length)")
