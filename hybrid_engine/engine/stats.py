"""What the last switch into generation mode and back cost, measured."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager


@dataclasses.dataclass
class SwitchStats:
    """Seconds and bytes of the last generation-mode switch (and of the last training step)."""

    gather_s: float = 0.0  # ZeRO-3 all-gathers
    gather_bytes: int = 0  # bytes this rank received (0 when DeepSpeed still held the parameters)
    fuse_s: float = 0.0  # LoRA deltas added into fused generation weights
    fuse_bytes: int = 0
    reshard_s: float = 0.0  # tensor-parallel shards cut from the gathered weights
    reshard_bytes: int = 0
    build_s: float = 0.0  # generation weights laid out (views where possible)
    copied_bytes: int = 0  # generation weights that are copies (fused q|k|v, bf16, shards, layer gathering)
    generate_s: float = 0.0
    generated_tokens: int = 0
    release_s: float = 0.0  # generation weights and KV cache freed, ZeRO-3 partitions restored
    train_step_s: float = 0.0  # the last engine.step()
    logprob_mismatch: dict | None = None  # engine.logprob_mismatch(): {"mean", "max"} vs training log-probs
    path: str = "fast"  # which path generated: "fast" (the inference transformer) or "hf" (transformers' generate)

    @property
    def switch_s(self) -> float:
        """The whole switch in and out, generation excluded."""
        return self.gather_s + self.fuse_s + self.reshard_s + self.build_s + self.release_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "switch_s": self.switch_s}


@contextmanager
def timed(stats: SwitchStats, field: str):
    """Adds the seconds spent inside to stats.<field>."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(stats, field, getattr(stats, field) + time.perf_counter() - t0)
