"""Cross-attention keys and values projected once per image batch, and reused.

Cross-attention keys and values depend only on the image and the layer, so
:meth:`~albef.models.fast.bert.FastTextEncoder.image_context` projects them once and every fusion
pass over the same images (the ITM positives, both kinds of negatives, MLM; re-ranking's pairs)
reuses them instead of re-projecting. Rows that read the batch's images in order need no index
at all, and the others' queries are regrouped by image rather than the keys/values copied per
row (:meth:`ImageContext.tile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor


class Grouping(NamedTuple):
    """Rows regrouped by the image they read: sorted row ``i`` (row ``order[i]``) is slot ``slot[i]``
    of group ``group[i]``, which reads image ``images[group[i]]``; ``size``: the largest group."""

    images: Tensor  # [U] the distinct images read, ascending
    order: Tensor  # [n] the rows, sorted by image
    group: Tensor  # [n]
    slot: Tensor  # [n]
    inverse: Tensor  # [n] where each row went in ``order``
    size: int

    @classmethod
    def of(cls, image_of_row: Tensor) -> Grouping:
        """
        >>> g = Grouping.of(torch.tensor([2, 0, 2]))
        >>> g.images.tolist(), g.order.tolist(), g.group.tolist(), g.slot.tolist(), g.size
        ([0, 2], [1, 0, 2], [0, 1, 1], [0, 0, 1], 2)
        """
        n, dev = len(image_of_row), image_of_row.device
        order = torch.argsort(image_of_row, stable=True)
        images, counts = torch.unique_consecutive(image_of_row[order], return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(images), device=dev), counts)
        slot = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[group]
        return cls(images, order, group, slot, torch.argsort(order), int(counts.max()) if n else 0)

    @property
    def padded(self) -> int:
        """Query rows of the regrouped layout, every group padded to the largest."""
        return len(self.images) * self.size


@dataclass(frozen=True, eq=False)
class Tiling:
    """Query rows ``t * B + b`` (t < tiles) read image b; the rows after them read images ``extra``."""

    tiles: int
    extra: Tensor  # [n_extra] rows of the image batch

    @cached_property
    def groups(self) -> Grouping:
        """The ``extra`` rows regrouped by image: computed on first use (it reads counts back to the
        host), once for every layer of a fusion pass."""
        return Grouping.of(self.extra)


class KV(NamedTuple):
    """What one attention reads: keys and values [B, h, N, d], the mask [B, 1, 1 or L, N]
    (True = attend; None: every key), and how query rows map to them when tiled."""

    keys: Tensor
    values: Tensor
    mask: Tensor | None
    tiling: Tiling | None = None


@dataclass
class ImageContext:
    """Cross-attention keys/values of every fusion layer for a batch of image sequences.

    ``keys[i]`` / ``values[i]``: [B, heads, N, head_dim] for fusion layer ``fusion_layer + i``.
    ``mask``: boolean [B, 1, 1, N] (True = attend) or None when every image token is valid.
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor | None = None
    tiling: Tiling | None = None

    def tile(self, tiles: int, extra: Tensor) -> ImageContext:
        """The batch ``tiles`` times over in order, then rows ``extra``: what ``select(cat([arange(B)]
        * tiles + [extra]))`` gives, without copying the tiled keys/values. Attention regroups those
        rows' queries by image instead (cross-attention queries do not attend to each other), and
        gradients reach the keys/values without a scatter. The ``extra`` rows' queries too are laid
        side by side per image where no attention dropout is drawn (inference)."""
        return ImageContext(self.keys, self.values, self.mask, Tiling(tiles, extra))

    def layer(self, i: int) -> KV:
        """What fusion layer ``fusion_layer + i`` reads."""
        return KV(self.keys[i], self.values[i], self.mask, self.tiling)
