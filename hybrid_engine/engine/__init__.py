"""The hybrid engine: training mode (DeepSpeed ZeRO 0-3 or plain torch, LoRA) and generation mode."""

from hybrid_engine.engine.engine import HybridEngine
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.stats import SwitchStats

__all__ = ["GenerationSettings", "HybridEngine", "SwitchStats"]
