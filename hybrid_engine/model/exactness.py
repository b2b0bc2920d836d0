"""Config fields the generation-mode transformer cannot honour exactly, refused by name so that such a model takes
the HF path (engine/hf_path.py) instead of a silently different answer."""

from __future__ import annotations

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies and attention scaling are fixed when the model is built: the fast path reads them
from the HF model's rotary module (inv_freq, attention_scaling)."""
DYNAMIC_ROPE = ("longrope", "dynamic")
"""RoPE types whose frequencies change with the length of each forward call: the fast path picks its tables per call
as HF's rotary module does (model/rope.py). Any other type is unknown to it."""


def _rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope if isinstance(rope, dict) else {}


def _rope_type(rope: dict) -> str:
    return str(rope.get("rope_type", rope.get("type", "default")))


def dynamic_rope(config) -> str | None:
    """The config's RoPE type when it is one of DYNAMIC_ROPE, else None."""
    rope_type = _rope_type(_rope_parameters(config))
    return rope_type if rope_type in DYNAMIC_ROPE else None


def longrope_rerun_width(config) -> int | None:
    """Phi-3's original_max_position_embeddings under LongRoPE: the width past which its HF generate reruns the
    whole sequences without a cache (Phi3ForCausalLM.prepare_inputs_for_generation), so that every cached key is
    rotated with the long factors. For a static RoPE that rerun gives the same values up to rounding: None."""
    if getattr(config, "model_type", None) != "phi3" or dynamic_rope(config) != "longrope":
        return None
    return int(config.original_max_position_embeddings)


ROPE_PER_LAYER_TYPE = {"gemma3_text": ("full_attention", "sliding_attention")}
"""Families whose nested rope_parameters (one dict per layer type) the fast path serves, a cos/sin table per type."""


def check_rope(config) -> None:
    """Refuses, naming the field, a RoPE the fast path does not compute exactly: a type outside STATIC_ROPE and
    DYNAMIC_ROPE, or parameters per layer type (transformers 5's nested rope_parameters) outside ROPE_PER_LAYER_TYPE's
    families, whose types must be static."""
    model_type = getattr(config, "model_type", None)
    rope = _rope_parameters(config)
    if any(isinstance(value, dict) for value in rope.values()):
        served = ROPE_PER_LAYER_TYPE.get(model_type, ())
        if not served or any(name not in served for name in rope):
            raise ValueError(f"{model_type}: rope_parameters per layer type ({', '.join(rope)}) are not computed by "
                             "the fast path (one RoPE table serves every layer)")
        for params in rope.values():
            check_rope_type(model_type, params or {}, STATIC_ROPE)
        return
    check_rope_type(model_type, rope, STATIC_ROPE + DYNAMIC_ROPE)


def check_rope_type(model_type: str | None, rope: dict, served: tuple[str, ...]) -> None:
    """Refuses a rope_type outside `served` by name."""
    rope_type = _rope_type(rope)
    if rope_type not in served:
        raise ValueError(f"{model_type}: rope_parameters['rope_type']={rope_type!r} is not computed by the fast path "
                         f"(it serves {', '.join(served)})")
