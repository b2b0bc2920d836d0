"""Config fields the generation-mode transformer cannot honour exactly, refused by name so that such a model takes
the HF path (engine/hf_path.py) instead of a silently different answer."""

from __future__ import annotations

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies and attention scaling are fixed when the model is built: the fast path reads them
from the HF model's rotary module (inv_freq, attention_scaling). Dynamic ones ("dynamic", "longrope") change with
the sequence length; any other is unknown to it."""


ROPE_PER_LAYER_TYPE = {"gemma3_text": ("full_attention", "sliding_attention")}
"""Families whose nested rope_parameters (one dict per layer type) the fast path serves, a cos/sin table per type."""


def check_rope(config) -> None:
    """Refuses, naming the field, a RoPE the fast path does not compute exactly: a type outside STATIC_ROPE, or
    parameters per layer type (transformers 5's nested rope_parameters) outside ROPE_PER_LAYER_TYPE's families."""
    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return
    if any(isinstance(value, dict) for value in rope.values()):
        served = ROPE_PER_LAYER_TYPE.get(model_type, ())
        if not served or any(name not in served for name in rope):
            raise ValueError(f"{model_type}: rope_parameters per layer type ({', '.join(rope)}) are not computed by "
                             "the fast path (one RoPE table serves every layer)")
        for params in rope.values():
            check_rope_type(model_type, params or {})
        return
    check_rope_type(model_type, rope)


def check_rope_type(model_type: str | None, rope: dict) -> None:
    """Refuses a rope_type outside STATIC_ROPE by name."""
    rope_type = str(rope.get("rope_type", rope.get("type", "default")))
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"{model_type}: rope_parameters['rope_type']={rope_type!r} is not computed by the fast path "
                         f"(it serves {', '.join(STATIC_ROPE)}: their frequencies do not change with the length)")
