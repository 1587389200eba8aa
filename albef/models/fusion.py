"""Several groups of (text, image) rows through the fusion layers as one batch.

Pretraining fuses the ITM positives, both kinds of hard negatives and the masked captions; each
group has its own texts, its own images and its own outputs of interest (the [CLS] for ITM, the
masked tokens for MLM). :class:`FusionRows` names the groups, ``model.fuse_rows(rows, images)``
runs them as one batch (wider matrix products, one gradient per fusion weight) and hands each
group's outputs back by name. The plain model concatenates, fuses and reads; the fast one
(:mod:`albef.models.fast`) also computes the last layer only where a group reads and lets rows
that read the images in order share their keys/values.

Example:
    >>> from albef.config import get_preset
    >>> from albef.models.albef import ALBEF
    >>> model = ALBEF(get_preset("albef-tiny")).eval()
    >>> images = model.encode_image(torch.randn(2, 3, 32, 32))
    >>> ids = torch.tensor([[101, 1037, 3899], [101, 1037, 4937]]); mask = torch.ones_like(ids)
    >>> text = model.encode_text(ids, mask)
    >>> rows = FusionRows()
    >>> rows.add("pairs", text, mask)                                      # text b with image b
    >>> rows.add("swapped", text, mask, images=torch.tensor([1, 0]))       # text b with image 1 - b
    >>> rows.add("words", text, mask, read=Positions.of(ids == 1037))      # the tokens 1037 only
    >>> out = model.fuse_rows(rows, images)
    >>> [tuple(out[name].shape) for name in out]
    [(2, 32), (2, 32), (2, 32)]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Positions(NamedTuple):
    """Some positions of each row: ``index`` [n, P] in ascending order, -1 where a row has fewer
    than P; ``keep`` [n, P] = ``index >= 0``."""

    index: Tensor
    keep: Tensor

    @classmethod
    def of(cls, mask: Tensor) -> Positions:
        """The True positions of a boolean [n, L] mask (P = the most of a row, at least 1).

        >>> Positions.of(torch.tensor([[False, True, True], [True, False, False]])).index.tolist()
        [[1, 2], [0, -1]]
        """
        n, L = mask.shape
        counts = mask.sum(1)
        P = max(1, int(counts.max())) if n else 1
        key = torch.arange(L, device=mask.device) + L * (~mask).long()  # the True ones first, in order
        index = key.argsort(dim=1)[:, :P]
        keep = torch.arange(P, device=mask.device) < counts[:, None]
        return cls(index.masked_fill(~keep, -1), keep)

    def read(self, hidden: Tensor) -> Tensor:
        """[n, L, H] -> [count, H]: what ``hidden[mask]`` gives for the mask these came from."""
        index = self.index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)[self.keep]


class RowGroup(NamedTuple):
    text: Tensor  # [n, L, H] text-layer output
    mask: Tensor  # [n, L] its attention mask
    images: Tensor | None  # [n] the image each row reads (a row of the image batch); None: row b reads image b
    read: Positions | None  # the positions whose output is wanted; None: the [CLS] alone

    def output(self, hidden: Tensor) -> Tensor:
        """This group's outputs from its whole fused rows [n, L, H]: [n, H] ([CLS]) or [count, H]."""
        return hidden[:, 0] if self.read is None else self.read.read(hidden)


class FusionRows:
    """Named groups of fusion-pass rows: concatenated into one batch, split back by name."""

    def __init__(self) -> None:
        self.groups: dict[str, RowGroup] = {}

    def add(
        self, name: str, text: Tensor, mask: Tensor, images: Tensor | None = None, read: Positions | None = None
    ) -> None:
        """Rows ``text`` [n, L, H] with ``mask`` [n, L] reading ``images`` [n] (None: row b reads
        image b), of which the outputs at ``read`` are wanted (None: the [CLS])."""
        if name in self.groups:
            raise ValueError(f"a group named {name!r} is there already")
        self.groups[name] = RowGroup(text, mask, images, read)

    def cat(self, names: list[str]) -> tuple[Tensor, Tensor]:
        """The texts [N, L, H] and masks [N, L] of the groups ``names``, in that order."""
        groups = [self.groups[n] for n in names]
        return torch.cat([g.text for g in groups]), torch.cat([g.mask for g in groups])

    def image_index(self, names: list[str], batch: int, device: torch.device) -> Tensor:
        """[N] the image of each row of the groups ``names`` (rows of an image batch of ``batch``)."""
        parts = [
            torch.arange(batch, device=device) if self.groups[n].images is None else self.groups[n].images
            for n in names
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def split(self, fused: Tensor, names: list[str]) -> dict[str, Tensor]:
        """Fused rows [N, ...] of the groups ``names`` (in that order) -> each group's [n, ...]."""
        sizes = [len(self.groups[n].text) for n in names]
        return dict(zip(names, fused.split(sizes), strict=True))
