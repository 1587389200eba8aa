"""The ALBEF model's fast methods: one word-embedding gradient for the lookup and the MLM decoder,
a reusable image context, the last layer on a few positions, and :meth:`FastALBEF.fuse_rows` laid
out so that rows reading the images in order share their keys/values."""

from __future__ import annotations

import torch
from torch import Tensor

from albef.models.albef import ALBEF
from albef.models.bert import ImageInput
from albef.models.fast.context import ImageContext
from albef.models.fast.tied import TiedGrad
from albef.models.fusion import FusionRows, RowGroup


class FastALBEF(ALBEF):
    """:class:`~albef.models.albef.ALBEF` with the fast text encoder's options in its methods:
    ``image`` may be an :class:`ImageContext` (:meth:`image_context`), and ``positions`` [B, P]
    computes the last layer for those positions only ([B, P, H]; -1 pads a row with fewer, and
    comes back as zeros)."""

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # The lookup and the MLM decoder share the word-embedding table: the next mlm_logits hands
        # its weight gradient to this lookup (one table-sized gradient, made at the end). A lookup
        # whose backward does not run with the decoder's is simply not deferred to (tied.py).
        tie = None
        if self.mlm_head is not None and torch.is_grad_enabled():
            tie = self._tie = TiedGrad()
        return self.text_encoder.encode_text(input_ids, attention_mask, tie)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        if self.mlm_head is None:
            raise RuntimeError("this model was built without an MLM head")
        table = self.text_encoder.embeddings.word_embeddings.weight
        return self.mlm_head(hidden, table, getattr(self, "_tie", None))

    def image_context(self, image_embeds: ImageInput, image_mask: Tensor | None = None) -> ImageContext:
        """Cross-attention keys/values of the images, to reuse across several fusion passes."""
        return self.text_encoder.image_context(image_embeds, image_mask)

    def fuse(
        self,
        text_embeds: Tensor,
        attention_mask: Tensor,
        image: ImageInput | ImageContext,
        image_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        return self.text_encoder.fuse(text_embeds, attention_mask, image, image_mask, positions)

    def itm_cls(
        self,
        text_embeds: Tensor,
        attention_mask: Tensor,
        image: ImageInput | ImageContext,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        # the last layer's work on the other tokens is about a sixth of BERT-base's six fusion layers
        positions = torch.zeros(text_embeds.shape[0], 1, dtype=torch.long, device=text_embeds.device)
        return self.fuse(text_embeds, attention_mask, image, image_mask, positions)

    def encode_multimodal(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image: ImageInput | ImageContext,
        image_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        return self.text_encoder(input_ids, attention_mask, image, image_mask, positions)

    def fuse_rows(self, rows: FusionRows, image_embeds: Tensor) -> dict[str, Tensor]:
        """The plain :meth:`~albef.models.albef.ALBEF.fuse_rows`, with the image keys/values projected
        once; groups that read the images in order go first and attend to them as they are
        (:meth:`ImageContext.tile`: no gathered copy per row, no scatter in the backward); the
        others' queries are regrouped by image in inference, and read gathered keys/values where
        attention dropout is drawn. The last layer computes the positions the groups read only."""
        B, dev = len(image_embeds), image_embeds.device
        in_order = [n for n, g in rows.groups.items() if _reads_in_order(g, B)]
        others = [n for n in rows.groups if n not in in_order]
        order = in_order + others
        context = self.image_context(image_embeds)
        extra = rows.image_index(others, B, dev)
        if in_order != [*rows.groups] or len(in_order) > 1:
            context = context.tile(len(in_order), extra)
        text, mask = rows.cat(order)
        groups = [rows.groups[n] for n in order]
        fused = self.fuse(text, mask, context, positions=_positions(groups, dev))  # [N, P, H]
        out = rows.split(fused, order)
        return {n: _read(rows.groups[n], out[n]) for n in rows.groups}


def _reads_in_order(group: RowGroup, batch: int) -> bool:
    images = group.images
    return images is None or (len(images) == batch and torch.equal(images, torch.arange(batch, device=images.device)))


def _positions(groups: list[RowGroup], device: torch.device) -> Tensor:
    """The last layer's positions of the concatenated groups: [N, P], -1 padding a row."""
    N = sum(len(g.text) for g in groups)
    if all(g.read is None for g in groups):
        return torch.zeros(N, 1, dtype=torch.long, device=device)  # the [CLS] of each row
    P = max(g.read.index.shape[1] for g in groups if g.read is not None)
    parts = []
    for g in groups:
        p = torch.full((len(g.text), P), -1, dtype=torch.long, device=device)
        if g.read is None:
            p[:, 0] = 0
        else:
            p[:, : g.read.index.shape[1]] = g.read.index
        parts.append(p)
    return torch.cat(parts)


def _read(group: RowGroup, fused: Tensor) -> Tensor:
    """A group's outputs from its rows of the last layer's [n, P, H]."""
    if group.read is None:
        return fused[:, 0]
    return fused[:, : group.read.index.shape[1]][group.read.keep]
