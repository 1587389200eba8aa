"""The real tokens of a padded batch, and the few positions a last layer computes.

A batch of captions is padded to its longest, and a third or more of its positions are often
padding. No output reads a padding position (it is masked out as a key; ITC and ITM read [CLS],
MLM the masked tokens), and everything in a layer but attention works token by token, so the
fast layers run on the real tokens alone (:class:`Packing`: projections, feed-forward, LayerNorm,
dropout) and pad only around attention (the embeddings still run on the padded batch). The real
tokens' values are the plain model's; the hidden states at padding positions come back as zeros,
where the plain model leaves whatever its padded computation gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class Packing:
    """The real tokens of a padded batch: the per-token work runs on [T, ...] instead of [B, L, ...].

    Example:
        >>> pk = Packing.of(torch.tensor([[1, 1, 0], [1, 0, 0]]))
        >>> pk.index.tolist(), pk.pack(torch.arange(6).view(2, 3)).tolist()
        ([0, 1, 3], [0, 1, 3])
        >>> pk.pad(torch.tensor([5, 6, 7])).tolist()
        [[5, 6, 0], [7, 0, 0]]
    """

    index: Tensor  # [T] flat positions b * L + i of the real tokens, ascending
    batch: int
    length: int
    rows: Tensor = field(init=False)  # [T] b of each real token
    cols: Tensor = field(init=False)  # [T] i of each real token

    def __post_init__(self) -> None:
        self.rows, self.cols = self.index // self.length, self.index % self.length
        self._head_rows: dict[int, Tensor] = {}  # heads -> [T * heads] rows of [B * heads * L, d]

    @classmethod
    def of(cls, attention_mask: Tensor) -> Packing | None:
        """None when no position is padding (nothing to gain)."""
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        if index.numel() == attention_mask.numel():
            return None
        return cls(index, attention_mask.shape[0], attention_mask.shape[1])

    def pack(self, x: Tensor) -> Tensor:  # [B, L, ...] -> [T, ...]
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:  # [T, ...] -> [B, L, ...], zeros at padding
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])

    def pad_heads(self, x: Tensor, heads: int) -> Tensor:  # [T, H] -> [B, h, L, H / h], zeros at padding
        # written straight into attention's layout: the head split costs no copy of its own
        out = x.new_zeros(self.batch, heads, self.length, x.shape[-1] // heads)
        out.transpose(1, 2)[self.rows, self.cols] = x.view(x.shape[0], heads, x.shape[-1] // heads)
        return out

    def pack_heads(self, x: Tensor) -> Tensor:  # [B, h, L, d] -> [T, h * d]
        B, h, L, d = x.shape
        if x.transpose(1, 2).is_contiguous():  # [B, L, h, d] in memory (SDPA's output): token rows
            return self.pack(x.transpose(1, 2).reshape(B, L, h * d))
        # rows of d, one per (token, head): a plain row gather, where indexing the transposed view
        # with (rows, cols) took 2.5x as long forward and backward
        rows = self._head_rows.get(h)
        if rows is None:
            heads = torch.arange(h, device=x.device)
            rows = self._head_rows[h] = ((self.rows[:, None] * h + heads) * L + self.cols[:, None]).reshape(-1)
        return x.reshape(B * h * L, d).index_select(0, rows).view(-1, h * d)

    def locate(self, positions: Tensor) -> Tensor:
        """[B, P] positions -> [B * P] rows of the packed tensor; a padding position maps to row 0
        (its output is unspecified, as a padding position's always is)."""
        rows = torch.zeros(self.batch * self.length, dtype=torch.long, device=self.index.device)
        rows[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        offsets = torch.arange(self.batch, device=positions.device)[:, None] * self.length
        return rows[(positions + offsets).reshape(-1)]


class LastRows(NamedTuple):
    """The positions a last layer computes, when only a few of its outputs are read (ITM's [CLS],
    MLM's masked tokens): every token is still a key/value of its self-attention, but queries,
    cross-attention and feed-forward run for these alone."""

    positions: Tensor  # [B, P]; -1 = none (a row with fewer than P)
    ragged: Packing | None  # the positions that exist, packed, when P > 1

    @classmethod
    def of(cls, positions: Tensor) -> LastRows:
        # one position per row is never packed: a -1 there is zeroed at the end instead, which
        # spares ITM's [CLS] pass a host sync on a GPU (nonzero)
        return cls(positions, None if positions.shape[1] == 1 else Packing.of(positions >= 0))

    def output(self, x: Tensor) -> Tensor:
        """The last layer's rows -> [B, P, H], zeros where a row has no position."""
        if self.ragged is not None:
            return self.ragged.pad(x)
        return x.masked_fill((self.positions < 0).unsqueeze(-1), 0.0)
