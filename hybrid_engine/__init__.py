"""hybrid-engine: fast, affordable RLHF for ChatGPT-style models, from a laptop CPU to a GPU cluster."""

from hybrid_engine import ops
from hybrid_engine.allocator import keep_freed_memory
from hybrid_engine.engine import GenerationSettings, HybridEngine, SwitchStats
from hybrid_engine.engine.patch import apply_hybrid_engine
from hybrid_engine.engine.train_kernels import apply_training_kernels, unapply_training_kernels
from hybrid_engine.generation import GenerationOutput, generate
from hybrid_engine.ops import get_backend, use_backend

__version__ = "0.1.0"

__all__ = ["GenerationOutput", "GenerationSettings", "HybridEngine", "SwitchStats", "__version__",
           "apply_hybrid_engine", "apply_training_kernels", "generate", "get_backend", "keep_freed_memory", "ops",
           "unapply_training_kernels", "use_backend"]
