"""Padding-free (packed) rows: the real tokens of a padded batch laid end to end in one row, each row's position ids
counted from 0, so that a training forward runs no padding.

transformers 5 reads such a row as packed sequences from its position ids (masking_utils'
find_packed_sequence_indices: a new sequence wherever the position does not go up by one) and bounds attention to
each sequence (a block-diagonal causal mask for sdpa and eager, varlen for flash attention), when the forward gets
no 2-D attention mask and no cache: Packing.kwargs passes attention_mask=None and use_cache=False. Per-token outputs
of the packed row [1, N, ...] go back to the padded layout [B, T, ...] with Packing.unpack (0 at padding), and a
reward model reads each row's last token at Packing.last.

    packing = packing_of(attention_mask)               # attention_mask (B, T), padded on either side
    out = model(**packing.kwargs(input_ids))           # (1, N, V): N = attention_mask.sum()
    logits = packing.unpack(out.logits)                # (B, T, V), 0 at padding
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_PACKABLE = {"opt": "OPT's forward computes its positions and its mask from the attention mask, not position ids"}
"""Families whose forward does not bound attention by position ids, with the reason (check_packable refuses them)."""


def check_packable(config) -> None:
    """Refuses a model (by its config) whose forward cannot run packed rows."""
    reason = NOT_PACKABLE.get(getattr(config, "model_type", None))
    if reason is not None:
        raise ValueError(f"packing needs a model whose attention is bounded by position ids: {reason}; "
                         "set packing to false for this model")


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch (B, T) lie in its packed row (1, N)."""

    index: torch.Tensor
    """int64 [N]: each packed token's flat position in the padded batch (b * T + t), row after row."""
    position_ids: torch.Tensor
    """int64 [1, N]: each packed token's position in its own row, from 0."""
    lengths: torch.Tensor
    """int64 [B]: each row's number of real tokens."""
    shape: tuple[int, int]
    """(B, T): the padded batch's shape."""

    @property
    def last(self) -> torch.Tensor:
        """int64 [B]: the packed index of each row's last token (a row with no tokens has none: check first)."""
        return self.lengths.cumsum(0) - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] -> [1, N, ...]: the real tokens' entries, row after row."""
        B, T = self.shape
        return x.reshape(B * T, *x.shape[2:])[self.index][None]

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """y [1, N, ...] -> [B, T, ...]: back to the padded layout, 0 at padding; differentiable."""
        B, T = self.shape
        out = y.new_zeros((B * T, *y.shape[2:]))
        return out.index_put((self.index,), y[0]).view(B, T, *y.shape[2:])

    def kwargs(self, input_ids: torch.Tensor) -> dict:
        """An HF forward's arguments for the packed row of input_ids [B, T]: no attention mask and no cache, so that
        transformers bounds attention to each row by its position ids."""
        return {"input_ids": self.pack(input_ids), "attention_mask": None, "position_ids": self.position_ids,
                "use_cache": False}


def packing_of(attention_mask: torch.Tensor) -> Packing:
    """The Packing of a padded batch's attention_mask [B, T] (left, right or both-side padding); position ids as
    logprobs.positions gives the padded rows, so the packed forward computes what the padded one does."""
    mask = attention_mask.bool()
    flat = mask.reshape(-1)
    index = flat.nonzero().view(-1)
    position_ids = (mask.long().cumsum(1) - 1).reshape(-1)[index]
    return Packing(index=index, position_ids=position_ids[None], lengths=mask.sum(1), shape=tuple(mask.shape))
