"""Cross-attention keys and values projected once per image batch, and reused.

Cross-attention keys and values depend only on the image and the layer, so
:meth:`~albef.models.fast.bert.FastTextEncoder.image_context` projects them once and every fusion
pass over the same images (the ITM positives, both kinds of negatives, MLM; re-ranking's pairs)
reuses them by index instead of re-projecting. Rows that read the batch's images in order need
no index at all (:meth:`ImageContext.tile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class Tiling(NamedTuple):
    """Query rows ``t * B + b`` (t < tiles) read image b; the rows after them read images ``extra``."""

    tiles: int
    extra: Tensor  # [n_extra] rows of the image batch


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

    def select(self, index: Tensor) -> ImageContext:
        """Rows ``index`` of the batch (differentiable: gradients flow back to the projections)."""
        if self.tiling is not None:
            raise ValueError("select() of a tiled ImageContext")
        return ImageContext(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            None if self.mask is None else self.mask.index_select(0, index),
        )

    def tile(self, tiles: int, extra: Tensor) -> ImageContext:
        """The batch ``tiles`` times over in order, then rows ``extra``: what ``select(cat([arange(B)]
        * tiles + [extra]))`` gives, without copying the tiled keys/values. Attention regroups those
        rows' queries by image instead (cross-attention queries do not attend to each other), and
        gradients reach the keys/values without a scatter."""
        return ImageContext(self.keys, self.values, self.mask, Tiling(tiles, extra))

    def layer(self, i: int) -> KV:
        """What fusion layer ``fusion_layer + i`` reads."""
        return KV(self.keys[i], self.values[i], self.mask, self.tiling)
