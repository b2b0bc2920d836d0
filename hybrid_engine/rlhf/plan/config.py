"""What the memory planner is asked: the model, the machines and the run's settings (one dataclass, so that
`hybrid-engine plan --help` explains each from its field's doc)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_engine.model.dtypes import dtype_name, parse_dtype

TRAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALGOS = ("ppo", "grpo", "rloo")


@dataclass
class PlanConfig:
    """One RLHF run to plan: per rank, what each phase holds."""

    model: str = "7b"
    """The actor: a known size (350m, 1.3b, 6.7b or 7b, 13b, 30b, 65b or 66b, 70b: Llama shapes), a built-in preset
    (llama-20m, ...) or a folder holding a Hugging Face config.json."""
    critic_model: str | None = None
    """The reward model's and the critic's size, in model's forms; none: the actor's (DeepSpeed-Chat pairs a large
    actor with a 350m critic)."""
    algo: str = "ppo"
    """ppo (actor, critic, reference and reward model, as DeepSpeed-Chat's step 3), or grpo / rloo (no critic)."""
    world_size: int = 8
    """Data-parallel ranks (devices), across which ZeRO partitions."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage, 0-3: 1 partitions the optimizer state, 2 also the gradients, 3 also the weights."""
    weight_dtype: torch.dtype = torch.bfloat16
    """Training weights: bf16 or fp16 (mixed precision: an fp32 master copy and Adam's two fp32 moments per trained
    weight, as DeepSpeed keeps them) or fp32 (Adam's moments; DeepSpeed ZeRO 1-3 still copy their fp32 partition)."""
    lora_r: int = 0
    """LoRA rank on the actor; 0: every weight trains."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """The modules LoRA adapts, by name (peft's default for Llama)."""
    batch_size: int = 4
    """Sequences per rank per micro-batch: generation's batch and each training step's."""
    prompt_len: int = 256
    """Tokens of each prompt."""
    response_len: int = 256
    """Tokens generated per prompt."""
    checkpointing: bool = False
    """Activation checkpointing: each block keeps its input only and is recomputed in the backward pass."""
    gather: str = "all"
    """ZeRO-3 generation: all (the whole model gathered on every rank) or layer (one block gathered at a time, copied;
    the engine's generation.gather)."""
    inference_tp_size: int = 1
    """Ranks that generate together, tensor-parallel (the engine's generation.inference_tp_size): each keeps a copy of
    1/k of every block's weights."""
    generation_dtype: torch.dtype | None = None
    """The generation weights' dtype (the engine's generation.weight_dtype): none reads the training weights (their
    dtype); bf16 makes bf16 copies."""
    kv_dtype: torch.dtype = torch.float32
    """The KV cache's dtype (the engine's generation.kv_dtype): fp32, bf16 or fp16."""
    frozen_partitioned: bool = False
    """The reference and reward model ZeRO-3 partitioned across the ranks (not built: today every rank holds them
    whole, rlhf/scoring.py). PLANNED OPTION: set it when the engine partitions them."""
    device_memory_gib: float = 80.0
    """Memory of one device, GiB (an 80 GB A100/H100 has 79.3 GiB usable)."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed's zero_optimization.reduce_bucket_size (elements; its default): ZeRO 1-2's gradient bucket, ZeRO-3's
    reduce buffer."""
    prefetch_bucket_size: int = 50_000_000
    """DeepSpeed's stage3_prefetch_bucket_size (elements; its default): ZeRO-3 weights fetched ahead."""
    persistence_threshold: int = 100_000
    """DeepSpeed's stage3_param_persistence_threshold (elements; its default): ZeRO-3 keeps smaller weights whole."""

    def __post_init__(self):
        self.weight_dtype = parse_dtype(self.weight_dtype, TRAIN_DTYPES, "weight_dtype")
        if self.generation_dtype is not None:
            self.generation_dtype = parse_dtype(self.generation_dtype, TRAIN_DTYPES, "generation_dtype")
        self.kv_dtype = parse_dtype(self.kv_dtype, TRAIN_DTYPES, "kv_dtype")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.gather not in ("all", "layer"):
            raise ValueError(f"gather must be 'all' or 'layer', got {self.gather!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.inference_tp_size < 1 or self.world_size % self.inference_tp_size:
            raise ValueError(f"inference_tp_size must divide world_size ({self.world_size}), got "
                             f"{self.inference_tp_size}")
        for name in ("world_size", "batch_size", "prompt_len", "response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lora_r", "reduce_bucket_size", "prefetch_bucket_size", "persistence_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.device_memory_gib <= 0:
            raise ValueError(f"device_memory_gib must be positive, got {self.device_memory_gib}")

    @property
    def mixed_precision(self) -> bool:
        return self.weight_dtype != torch.float32

    def describe(self) -> str:
        """One line: the run planned."""
        lora = f", LoRA r{self.lora_r}" if self.lora_r else ""
        ckpt = ", checkpointing" if self.checkpointing else ""
        return (f"{self.model} ({self.algo}), {self.world_size} ranks, ZeRO-{self.zero_stage}, "
                f"{dtype_name(self.weight_dtype)}{lora}{ckpt}; batch {self.batch_size} x ({self.prompt_len} prompt + "
                f"{self.response_len} response); {self.device_memory_gib:g} GiB per device")
