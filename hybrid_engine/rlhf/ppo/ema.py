"""An exponential moving average of the actor's weights (DeepSpeed-Chat's --enable_ema), saved beside it.

The average is kept in fp32 tensors of its own, one per parameter of the trained module (LoRA adapters
included), updated after every PPO step with losses.ema_update. Under ZeRO-3 the parameters are gathered
around each update and each save; the average itself is whole on every rank.
"""

from __future__ import annotations

import os

import torch

from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.save import merged_model
from hybrid_engine.engine.zero import gathered, unique_params
from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.losses import ema_update


class ActorEMA:
    """EMA of `module`'s parameters with decay `beta` (ema <- beta * ema + (1 - beta) * param)."""

    def __init__(self, module: torch.nn.Module, beta: float = 0.992):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ema beta must be in [0, 1], got {beta}")
        self.module = module
        self.beta = float(beta)
        self.params = unique_params([module])
        with gathered(self.params):
            self.shadow = [p.detach().float().clone() for p in self.params]

    def update(self) -> None:
        with gathered(self.params):
            ema_update(self.shadow, [p.detach() for p in self.params], self.beta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The average as named tensors, for a checkpoint."""
        return {f"ema.{i}": t for i, t in enumerate(self.shadow)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.shadow):
            t.copy_(tensors[f"ema.{i}"])

    @torch.no_grad()
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the averaged model as `from_pretrained` loads it (LoRA merged); every rank calls this."""
        with gathered(self.params):
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.data.copy_(s)
            try:
                if rank_and_world()[0] == 0:
                    merged_model(base_model(self.module)).save_pretrained(directory)
            finally:
                for p, t in zip(self.params, live):
                    p.data.copy_(t)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
