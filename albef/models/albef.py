"""The ALBEF model: image encoder, text/fusion encoder, projections and heads.

This is the inference model; the momentum teacher, the feature queues and the losses live in
:mod:`albef.training`. It is built with the speedups of :mod:`albef.models.fast` applied
(``fast=False``: the plain model, as the paper draws it). Parameter names match the authors' downstream checkpoints
(``visual_encoder.*``, ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head``) so
conversion is a thin renaming (:mod:`albef.checkpoints.convert`); the MLM head is ``mlm_head.*`` (the
authors' ``text_encoder.cls.predictions.*``).

Example:
    >>> from albef.config import get_preset
    >>> model = ALBEF(get_preset("albef-tiny")).eval()
    >>> image_embeds = model.encode_image(torch.randn(2, 3, 32, 32))       # [2, 17, 32]
    >>> ids = torch.tensor([[101, 1037, 3899], [101, 1037, 4937]]); mask = torch.ones_like(ids)
    >>> text_embeds = model.encode_text(ids, mask)                         # [2, 3, 32]
    >>> sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T
    >>> fused = model.fuse(text_embeds, mask, image_embeds)                # [2, 3, 32]
    >>> model.itm_logits(fused).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.config import ALBEFConfig
from albef.models.bert import ImageInput, MLMHead, TextEncoder
from albef.models.fusion import FusionRows
from albef.models.vit import VisionTransformer


class ALBEF(nn.Module):
    def __init__(self, config: ALBEFConfig, mlm_head: bool = True, fast: bool = True):
        """``fast``: apply :func:`albef.models.fast.make_fast` (same parameters, same values)."""
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(config.text)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)
        self.mlm_head = MLMHead(config.text) if mlm_head else None
        self.temp = nn.Parameter(torch.tensor(config.temp))
        if config.head_init == "normal":
            for lin in (self.vision_proj, self.text_proj, self.itm_head):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        elif self.mlm_head is not None:  # the authors' heads are plain nn.Linear; BERT's MLM head has BERT's init
            nn.init.normal_(self.mlm_head.transform.dense.weight, std=0.02)
            nn.init.zeros_(self.mlm_head.transform.dense.bias)
        if config.cross_attention_init == "default":
            self.text_encoder.reset_cross_attention()
        if fast:
            apply_speedups(self)

    # -- unimodal -------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> image sequence [B, 1 + N, D_v] ([CLS] first)."""
        return self.visual_encoder(images)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] -> text sequence [B, L, H] from the text-only layers."""
        return self.text_encoder.encode_text(input_ids, attention_mask)

    def image_feat(self, image_embeds: Tensor) -> Tensor:
        """L2-normalised ITC embedding of the image [CLS]: [B, embed_dim]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, text_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """L2-normalised ITC embedding of the text: [B, embed_dim].

        The [CLS] state, as the authors (``text_pooling="cls"``); ``"mean"`` averages the real tokens
        instead, for text encoders trained with mean pooling (MiniLM's [CLS] carries nothing).
        """
        if self.config.text_pooling == "mean":
            if attention_mask is None:
                raise ValueError("text_pooling='mean' needs the attention mask")
            m = attention_mask.unsqueeze(-1).to(text_embeds.dtype)
            pooled = (text_embeds * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = text_embeds[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    # -- multimodal -----------------------------------------------------------------------
    def fuse(
        self, text_embeds: Tensor, attention_mask: Tensor, image: ImageInput, image_mask: Tensor | None = None
    ) -> Tensor:
        """Fusion layers over a text sequence from :meth:`encode_text`: [B, L, H]."""
        return self.text_encoder.fuse(text_embeds, attention_mask, image, image_mask)

    def fuse_rows(self, rows: FusionRows, image_embeds: Tensor) -> dict[str, Tensor]:
        """One fusion pass over named groups of rows (:mod:`albef.models.fusion`), each reading
        rows of ``image_embeds``: every group's outputs, [n, H] ([CLS]) or [count, H] (its positions)."""
        names = list(rows.groups)
        text, mask = rows.cat(names)
        images = image_embeds.index_select(0, rows.image_index(names, len(image_embeds), image_embeds.device))
        fused = self.fuse(text, mask, images)  # [N, L, H]
        return {name: rows.groups[name].output(h) for name, h in rows.split(fused, names).items()}

    def itm_cls(
        self, text_embeds: Tensor, attention_mask: Tensor, image: ImageInput, image_mask: Tensor | None = None
    ) -> Tensor:
        """The fused [CLS] alone, [B, 1, H], what :meth:`itm_logits` reads (the fast model computes
        the last layer for it alone)."""
        return self.fuse(text_embeds, attention_mask, image, image_mask)[:, :1]

    def encode_multimodal(
        self, input_ids: Tensor, attention_mask: Tensor, image: ImageInput, image_mask: Tensor | None = None
    ) -> Tensor:
        """All text layers with the image: equal to ``fuse(encode_text(...))``."""
        return self.text_encoder(input_ids, attention_mask, image, image_mask)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """ITM logits [B, 2] (index 1 = match) from the fused [CLS]."""
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """MLM logits [..., vocab] for hidden states [..., H] (pass only the positions needed)."""
        if self.mlm_head is None:
            raise RuntimeError("this model was built without an MLM head")
        return self.mlm_head(hidden, self.text_encoder.embeddings.word_embeddings.weight)

    # -- conveniences ---------------------------------------------------------------------
    def similarity(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Cosine similarity of every image with every text: [B_img, B_txt]."""
        image_feat = self.image_feat(self.encode_image(images))
        text_feat = self.text_feat(self.encode_text(input_ids, attention_mask), attention_mask)
        return image_feat @ text_feat.T

    def match(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM match probability of each (image b, text b) pair: [B]."""
        fused = self.encode_multimodal(input_ids, attention_mask, self.encode_image(images))
        return self.itm_logits(fused).softmax(-1)[:, 1]

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Recompute encoder blocks in the backward (see :func:`checkpointed_parts`)."""
        self.visual_encoder.grad_checkpointing, self.text_encoder.grad_checkpointing = checkpointed_parts(enable)


def apply_speedups(model: nn.Module) -> None:
    """:func:`albef.models.fast.make_fast`, imported when a model is built: the speed layer is
    written on top of these classes, so this module cannot import it at load time."""
    from albef.models.fast import make_fast

    make_fast(model)


def checkpointed_parts(setting: bool | str) -> tuple[bool, bool]:
    """``(vision, text)`` for ``train.grad_checkpointing``: ``True``/``"all"`` every encoder block,
    ``"vision"`` the ViT's only (most of a step's activations at batch sizes a CPU trains with),
    ``False``/``"none"`` none.

    >>> checkpointed_parts("vision")
    (True, False)
    """
    parts = {
        True: (True, True),
        "all": (True, True),
        "vision": (True, False),
        False: (False, False),
        "none": (False, False),
        None: (False, False),
    }  # None: YAML's null
    if (setting is None or isinstance(setting, (bool, str))) and setting in parts:
        return parts[setting]
    raise ValueError(f"grad_checkpointing must be true, false, 'all', 'vision' or 'none', not {setting!r}")
