"""Config fields the generation-mode transformer cannot honour exactly, refused by name so that such a model takes
the HF path (engine/hf_path.py) instead of a silently different answer."""

from __future__ import annotations

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies and attention scaling are fixed when the model is built: the fast path reads them
from the HF model's rotary module (inv_freq, attention_scaling). Dynamic ones ("dynamic", "longrope") change with
the sequence length; any other is unknown to it."""


def _rope_types(config) -> list[str]:
    """The RoPE types of `config` (transformers 5's rope_parameters, or the older rope_scaling; one per layer type
    where they are nested)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return ["default"]
    groups = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    return [str(g.get("rope_type", g.get("type", "default"))) for g in groups]


def check_rope(config) -> None:
    """Refuses a RoPE type the fast path does not compute exactly, naming the field."""
    for rope_type in _rope_types(config):
        if rope_type not in STATIC_ROPE:
            raise ValueError(f"{getattr(config, 'model_type', None)}: rope_parameters['rope_type']={rope_type!r} is "
                             f"not computed by the fast path (it serves {', '.join(STATIC_ROPE)})")
