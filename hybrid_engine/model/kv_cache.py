"""A preallocated KV cache: every layer's keys and values for a batch, compacted per sequence.

Sequence slot b holds its tokens at cache positions [0, lengths[b]) (prompt padding is never stored),
so the position of a token in the cache is also its rotary / learned position. Slots [0, active)
are the sequences still generating: a finished sequence's slot is refilled with the last active one,
so decode steps run on a contiguous prefix of the batch and finished sequences cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_engine.model.spec import ModelSpec


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, Hkv, T_max, D]
    v: torch.Tensor  # [L, B, Hkv, T_max, D]
    lengths: torch.Tensor  # int32 [B]: tokens stored per slot

    @classmethod
    def allocate(
        cls,
        spec: ModelSpec,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (spec.num_layers, batch, spec.num_kv_heads, max_len, spec.head_dim)
        return cls(
            # Zeroed, not empty: a reference implementation that masks scores still multiplies the
            # unused slots by zero, and 0 * NaN from stale memory would poison its output.
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            lengths=torch.zeros(batch, dtype=torch.int32, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot src's keys, values and length into slot dst (one row per layer)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = self.lengths[src]

    def copy_slots(self, index: torch.Tensor) -> None:
        """Slot b takes slot index[b]'s keys, values and length, for every b < len(index) (rows that share a prefix
        take the cache of the one row that ran it)."""
        n = len(index)
        if n == 0:
            return
        stored = int(self.lengths[index].max())
        self.k[:, :n, :, :stored] = self.k[:, index, :, :stored]
        self.v[:, :n, :, :stored] = self.v[:, index, :, :stored]
        self.lengths[:n] = self.lengths[index]
