"""The cos/sin tables a rotary model rotates q and k with in each forward call, chosen as HF's rotary module chooses
them (transformers' modeling_rope_utils.dynamic_rope_update).

A static RoPE type (exactness.STATIC_ROPE) has one table for every call. The two whose frequencies change with the
length (exactness.DYNAMIC_ROPE) decide per forward call from seq_len = max(position_ids) + 1 over the whole batch:

- longrope (Phi-3, Phi-4-mini): the short factors while seq_len <= original_max_position_embeddings, the long ones
  above it, both with the same attention factor; decided afresh in every call, so one row that crosses the original
  length switches every row of the batch to the long factors.
- dynamic (NTK): the base is rescaled for seq_len whenever seq_len exceeds the longest call seen so far (the module's
  max_seq_len_cached, which only grows), and reset to the original frequencies when a call is shorter than
  max_position_embeddings after a longer one. A call between the two keeps the frequencies of the longest call
  before it: the answer depends on the module's history (earlier generate calls and training forwards).

HF rotates only the q and k of the tokens in that call: keys already in its cache keep the rotation of the call that
wrote them, so after a switch mid-generation the cache holds keys of both tables. The fast path's cache holds rotated
keys too, and matches that. To match the history exactly, the tables follow the HF module itself: each call runs the
module's own update (a one-position forward of it, which leaves its state as HF's forward would) and reads the
frequencies it then holds.
"""

from __future__ import annotations

import torch

from hybrid_engine import ops

Tables = tuple[torch.Tensor, torch.Tensor]


class RopeTables:
    """cos, sin fp32 [P, R/2] for each forward call. rotary: HF's rotary module, for a RoPE type whose frequencies
    change with the length (None: the tables of inv_freq and attention_scaling serve every call)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int,
                 rotary: torch.nn.Module | None = None):
        self.rotary = rotary
        self.max_positions = max_positions
        self._kept: list[tuple[torch.Tensor, float, Tables]] = []  # the latest two: a short and a long table
        self.static = self._tables(inv_freq, attention_scaling, max_positions)

    def _tables(self, inv_freq: torch.Tensor, scaling: float, size: int) -> Tables:
        for freq, s, tables in self._kept:
            if s == scaling and tables[0].shape[0] >= size and torch.equal(freq, inv_freq):
                return tables
        cos, sin = ops.rotary_tables(inv_freq, size, scaling)
        tables = (cos.contiguous(), sin.contiguous())
        self._kept = [*self._kept[-1:], (inv_freq.detach().clone(), scaling, tables)]
        return tables

    @torch.no_grad()
    def at(self, seq_len: int, size: int = 0) -> Tables:
        """The tables of a forward call whose position ids reach seq_len - 1, with at least max(seq_len, size) rows;
        advances the HF module's state as that call would."""
        if self.rotary is None:
            return self.static
        inv_freq = self.rotary.inv_freq
        probe = torch.full((1, 1), seq_len - 1, dtype=torch.long, device=inv_freq.device)
        self.rotary(torch.zeros((), device=inv_freq.device), probe)  # HF's own update of inv_freq and its state
        rows = max(self.max_positions, seq_len, size)
        return self._tables(self.rotary.inv_freq.float(), float(self.rotary.attention_scaling), rows)
