"""The generation settings a HybridEngine owns, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hybrid_engine.model.spec import ModelSpec

_DTYPES = {None: None, "none": None, "fp32": None, "float32": None, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16}


@dataclass
class GenerationSettings:
    """How the engine's generation mode reads the trained weights."""

    weight_dtype: torch.dtype | None = None
    """None: generation reads the trained (fp32) weights themselves, exactly; torch.bfloat16: bf16 copies,
    made on entry and freed on exit (faster where the machine is bandwidth-bound, not exact)."""
    inference_tp_size: int = 1
    """Ranks that generate together, tensor-parallel: each keeps 1/k of every block's weights."""
    gather: str = "all"
    """ZeRO-3 only: "all" gathers the whole model at once (the generation weights are views of it);
    "layer" gathers one block at a time and keeps copies, so the gathered peak is one block."""

    @classmethod
    def parse(cls, value: GenerationSettings | dict | None) -> GenerationSettings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"generation must be a GenerationSettings, a dict or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"generation: unknown settings {unknown}; known: {sorted(known)}")
        settings = cls(**value)
        if isinstance(settings.weight_dtype, str) or settings.weight_dtype is None:
            key = settings.weight_dtype.lower() if isinstance(settings.weight_dtype, str) else None
            if key not in _DTYPES:
                raise ValueError(f"generation.weight_dtype must be None or 'bf16', got {settings.weight_dtype!r}")
            settings.weight_dtype = _DTYPES[key]
        return settings

    def check(self, spec: ModelSpec, world_size: int) -> None:
        """Refuses settings that cannot work for this model and world size, naming the setting."""
        if self.weight_dtype not in (None, torch.bfloat16, torch.float32):
            raise ValueError(f"generation.weight_dtype must be None or torch.bfloat16, got {self.weight_dtype}")
        if self.gather not in ("all", "layer"):
            raise ValueError(f"generation.gather must be 'all' or 'layer', got {self.gather!r}")
        tp = self.inference_tp_size
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"generation.inference_tp_size must be a positive int, got {tp!r}")
        if world_size % tp:
            raise ValueError(f"generation.inference_tp_size={tp} does not divide the world size {world_size}")
        if tp > 1:
            for name, n in (("attention heads", spec.num_heads), ("key/value heads", spec.num_kv_heads),
                            ("intermediate size", spec.intermediate_size)):
                if n % tp:
                    raise ValueError(f"generation.inference_tp_size={tp} does not divide the model's {name} ({n})")
