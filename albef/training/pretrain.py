"""The pretraining wrapper: ITC + ITM + MLM with momentum distillation.

:class:`ALBEFPretrainer` owns the training-only state (momentum teacher, feature queues) around
an inference :class:`~albef.models.albef.ALBEF`. One ``forward`` is one reference step, read in
the paper's order: the unimodal encoders of student and momentum teacher, ITC against the queues
as they were, ITM on hard negatives, MLM. Three things differ, for speed: the MLM masks are drawn
first (so one seed gives other draws than the reference's; ``draws`` replays any); the masked
captions share the text-only layers' pass with the originals, in student and teacher; and the
student's ITM pairs and masked captions share one fusion pass
(:class:`~albef.models.fusion.FusionRows`; same values up to float rounding, dropout draws
differ). With image ids (``idx``) it is the retrieval fine-tuning objective instead (id-aware ITC
targets and queue, same-id entries never negatives); with ``mlm=False`` the MLM term is left out.
The trainer computes the same with a plain model (``ALBEF(config, fast=False)``) as with a fast one.

Example:
    >>> from albef.config import get_preset
    >>> from albef.models.albef import ALBEF
    >>> trainer = ALBEFPretrainer(ALBEF(get_preset("albef-tiny")))
    >>> ids = torch.tensor([[101, 1037, 3899, 2003], [101, 1037, 4937, 0]])
    >>> out = trainer(torch.randn(2, 3, 32, 32), ids, (ids > 0).long(), alpha=0.4)
    >>> out.loss.backward()
    >>> sorted(out.losses())
    ['loss', 'loss_itc', 'loss_itm', 'loss_mlm']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from albef.models.albef import ALBEF
from albef.models.fusion import FusionRows, Positions
from albef.training.momentum import FeatureQueue, make_teacher, momentum_update
from albef.training.objectives import (
    IGNORE_INDEX,
    ITCOutput,
    hard_negative_weights,
    itc_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
)
from albef.training.trainer import Trainer

CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0


@dataclass
class PretrainDraws:
    """Random choices of one step, to replay a run exactly. Any field may be left None."""

    neg_image_idx: Tensor | None = None  # [B] negative image of each text (-1: none)
    neg_text_idx: Tensor | None = None  # [B] negative text of each image
    mlm_input_ids: Tensor | None = None  # [B, L] masked ids
    mlm_labels: Tensor | None = None  # [B, L] original ids where masked, -100 elsewhere


@dataclass
class Encoded:
    """One model's unimodal pass over the batch."""

    image_embeds: Tensor  # [B, 1 + N, Dv] ViT sequence
    text_embeds: Tensor  # [B, L, H] text-only layers (zeros at padding in a fast model)
    image_feat: Tensor  # [B, E] L2-normalised ITC embeddings
    text_feat: Tensor


@dataclass
class ITMOutput:
    loss: Tensor
    logits: Tensor  # [N, 2] of the pairs, in order: positives, (text, negative image), (negative text, image)
    labels: Tensor  # [N]: 1 for the B positives, 0 after
    text_rows: Tensor  # [N] the caption of each pair (a row of the batch)
    image_rows: Tensor  # [N] its image
    weights_i2t: Tensor  # [B, B] hard-negative sampling weights of each image's negative text
    weights_t2i: Tensor


@dataclass
class MLMOutput:
    loss: Tensor  # (1 - alpha) * ce + alpha * distill
    ce: Tensor
    distill: Tensor | None
    logits: Tensor  # [n_masked, V] at labels != -100 (row-major)
    logits_m: Tensor | None  # the teacher's, None without distillation


@dataclass
class PretrainOutput:
    """One step's losses, per objective, and its intermediate values (references, no extra
    memory): for logging, tests and parity."""

    loss: Tensor  # itc + itm + mlm
    alpha: float
    student: Encoded
    teacher: Encoded  # the momentum model's: its features are what the queues take
    itc: ITCOutput
    itm: ITMOutput
    mlm: MLMOutput | None
    draws: PretrainDraws  # what was actually used

    def losses(self) -> dict[str, Tensor]:
        """The logged losses by name: ``loss``, ``loss_itc``, ``loss_itm`` (and ``loss_mlm``)."""
        out = {"loss": self.loss, "loss_itc": self.itc.loss, "loss_itm": self.itm.loss}
        if self.mlm is not None:
            out["loss_mlm"] = self.mlm.loss
        return out


class Negatives(NamedTuple):
    image: Tensor  # [B] the negative image of each text, -1: none
    text: Tensor  # [B] the negative text of each image
    weights_i2t: Tensor  # [B, B] the weights they were drawn with
    weights_t2i: Tensor


class ALBEFPretrainer(Trainer):
    """Training-time ALBEF: the student, its momentum teacher and the feature queues."""

    def __init__(
        self,
        model: ALBEF,
        mlm: bool = True,
        with_idx: bool = False,
        hard_negative_eps: float = 0.0,
        clamp_temp: bool = True,
        itc: bool = True,
        hard_negatives: bool = True,
        itc_distill: bool = True,
        mlm_distill: bool = True,
    ):
        """``itc`` .. ``mlm_distill`` switch the paper's ablation rows: ``itc=False`` leaves the ITC
        loss out (and ITM negatives are then random); ``hard_negatives=False`` draws ITM negatives
        uniformly; ``itc_distill`` / ``mlm_distill`` turn momentum distillation off per objective."""
        cfg = model.config
        if mlm and model.mlm_head is None:
            raise ValueError("MLM pretraining needs a model built with an MLM head")
        teacher = make_teacher(model)
        if not mlm:
            teacher.mlm_head = None
        super().__init__(model, teacher, FeatureQueue(cfg.embed_dim, cfg.queue_size, with_idx=with_idx), cfg.momentum)
        self.mlm = mlm
        self.mlm_probability = cfg.mlm_probability
        self.hard_negative_eps = hard_negative_eps
        self.clamp_temp = clamp_temp  # the authors' pretraining clamps it each step; their retrieval model does not
        self.use_itc, self.hard_negatives = itc, hard_negatives
        self.itc_distill, self.mlm_distill = itc_distill, mlm_distill

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        alpha: float,
        idx: Tensor | None = None,
        draws: PretrainDraws | None = None,
        generator: torch.Generator | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
    ) -> PretrainOutput:
        """One training step's losses. ``alpha``: distillation weight (ramped by the caller).

        ``idx`` (image ids, [B]) switches to the retrieval objective. ``draws`` replays the
        random choices; those left None are drawn from ``generator``. Gradient accumulation
        passes ``update_momentum`` only on the first micro-batch and ``enqueue=False``, then
        enqueues the micro-batches' momentum features together after the last one: exactly
        what the same global batch spread over that many ranks does.
        """
        model, teacher = self.model, self.model_m
        draws = draws or PretrainDraws()
        if self.clamp_temp:
            with torch.no_grad():
                model.temp.clamp_(0.001, 0.5)
        # The MLM inputs are drawn first: the masked captions go through the text-only layers
        # in one batch with the originals (same weights, same padding), in student and teacher.
        mlm_ids = labels = None
        if self.mlm:
            mlm_ids, labels = self._mlm_inputs(input_ids, draws, generator)
        teacher_mlm = self.mlm and self.mlm_distill and alpha > 0

        # Unimodal encoders: the student, then the momentum teacher, updated before use
        student, mlm_text = _encode(model, images, input_ids, mlm_ids, attention_mask)
        with torch.no_grad():
            if update_momentum:
                momentum_update(model, teacher, self.momentum)
            momentum, mlm_text_m = _encode(teacher, images, input_ids, mlm_ids if teacher_mlm else None, attention_mask)

        # ITC against the queues as they were before this batch's momentum features join them
        itc = self._itc(student, momentum, alpha, idx, enqueue)

        # ITM: the positives, and for each text an image and for each image a text drawn from the
        # most similar ones (hard negatives; a row of a batch of one has none)
        neg = self._hard_negatives(itc, idx, draws, generator)
        rows = torch.arange(len(input_ids), device=images.device)
        has_img, has_txt = neg.image >= 0, neg.text >= 0
        itm_pairs = {
            "positive": (rows, rows),
            "negative_image": (rows[has_img], neg.image[has_img]),
            "negative_text": (neg.text[has_txt], rows[has_txt]),
        }  # name: (texts, images)
        pairs = FusionRows()
        for name, (texts, imgs) in itm_pairs.items():
            pairs.add(name, student.text_embeds.index_select(0, texts), attention_mask.index_select(0, texts), imgs)
        # MLM: the masked captions, each with its own image; only the masked positions are read
        masked = None
        if self.mlm:
            masked = Positions.of(labels != IGNORE_INDEX)
            pairs.add("mlm", mlm_text, attention_mask, read=masked)

        # One fusion pass for both: each fusion weight gets its gradient in one piece, and the
        # matrix products are wider (FusionRows concatenates the groups and splits them back)
        fused = model.fuse_rows(pairs, student.image_embeds)
        itm = self._itm(fused, itm_pairs, neg)
        mlm = None
        if self.mlm:
            mlm = self._mlm(fused["mlm"], labels, masked, mlm_text_m, momentum, attention_mask, alpha)
        loss = (itc.loss if self.use_itc else 0.0) + itm.loss
        if mlm is not None:
            loss = loss + mlm.loss
        return PretrainOutput(
            loss, alpha, student, momentum, itc, itm, mlm, PretrainDraws(neg.image, neg.text, mlm_ids, labels)
        )

    def _mlm_inputs(
        self, input_ids: Tensor, draws: PretrainDraws, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        if draws.mlm_input_ids is not None and draws.mlm_labels is not None:
            return draws.mlm_input_ids.to(input_ids.device), draws.mlm_labels.to(input_ids.device)
        return mask_tokens(
            input_ids, self.model.config.text.vocab_size, MASK_ID, (PAD_ID, CLS_ID), self.mlm_probability, generator
        )

    def _itc(self, student: Encoded, momentum: Encoded, alpha: float, idx: Tensor | None, enqueue: bool) -> ITCOutput:
        q = self.queue
        image_queue, text_queue = q.image_queue, q.text_queue
        if enqueue and torch.is_grad_enabled():  # the backward reads the queues as they were before the enqueue below
            image_queue, text_queue = image_queue.clone(), text_queue.clone()
        itc = itc_loss(
            student.image_feat,
            student.text_feat,
            momentum.image_feat,
            momentum.text_feat,
            image_queue,
            text_queue,
            self.model.temp,
            alpha if self.itc_distill else 0.0,
            idx,
            None if idx is None else q.idx_queue,
        )
        if enqueue:
            q.enqueue(momentum.image_feat, momentum.text_feat, idx)
        return itc

    @torch.no_grad()
    def _hard_negatives(
        self, itc: ITCOutput, idx: Tensor | None, draws: PretrainDraws, generator: torch.Generator | None
    ) -> Negatives:
        B = itc.sim_t2i.shape[0]
        device = itc.sim_t2i.device
        if idx is None:
            positive = torch.eye(B, dtype=torch.bool, device=device)
        else:
            positive = idx.view(-1, 1) == idx.view(1, -1)
        if self.hard_negatives and self.use_itc:
            w_t2i = hard_negative_weights(itc.sim_t2i[:, :B], positive, self.hard_negative_eps)
            w_i2t = hard_negative_weights(itc.sim_i2t[:, :B], positive, self.hard_negative_eps)
        else:  # ablation: any non-positive entry, uniformly
            w_t2i = w_i2t = (~positive).to(itc.sim_t2i.dtype)
        neg_image = draws.neg_image_idx if draws.neg_image_idx is not None else sample_hard_negatives(w_t2i, generator)
        neg_text = draws.neg_text_idx if draws.neg_text_idx is not None else sample_hard_negatives(w_i2t, generator)
        return Negatives(neg_image.to(device), neg_text.to(device), w_i2t, w_t2i)

    def _itm(self, fused: dict[str, Tensor], itm_pairs: dict[str, tuple[Tensor, Tensor]], neg: Negatives) -> ITMOutput:
        """The ITM head and loss over the fused [CLS] of ``itm_pairs`` (name: (texts, images)),
        positives first."""
        cls = torch.cat([fused[name] for name in itm_pairs])  # [N, H]
        B = len(neg.image)
        logits = self.model.itm_head(cls)
        labels = torch.cat(
            [
                torch.ones(B, dtype=torch.long, device=cls.device),
                torch.zeros(len(cls) - B, dtype=torch.long, device=cls.device),
            ]
        )
        text_rows, image_rows = (torch.cat(rows) for rows in zip(*itm_pairs.values(), strict=True))
        return ITMOutput(
            F.cross_entropy(logits, labels), logits, labels, text_rows, image_rows, neg.weights_i2t, neg.weights_t2i
        )

    def _mlm(
        self,
        hidden: Tensor,
        labels: Tensor,
        masked: Positions,
        text_m: Tensor | None,
        momentum: Encoded,
        attention_mask: Tensor,
        alpha: float,
    ) -> MLMOutput:
        """``hidden`` [n_masked, H]: the student's fused masked tokens; ``text_m``: the masked captions
        after the teacher's text-only layers, None when the teacher's MLM pass is off."""
        logits = self.model.mlm_logits(hidden)  # [n_masked, V]
        logits_m = None
        if text_m is not None:
            with torch.no_grad():
                rows = FusionRows()
                rows.add("mlm", text_m, attention_mask, read=masked)
                logits_m = self.model_m.mlm_logits(self.model_m.fuse_rows(rows, momentum.image_embeds)["mlm"])
        loss, ce, distill = mlm_loss(
            logits, labels[labels != IGNORE_INDEX], logits_m, alpha if self.mlm_distill else 0.0
        )
        return MLMOutput(loss, ce, distill, logits, logits_m)


def _encode(
    model: ALBEF, images: Tensor, input_ids: Tensor, mlm_ids: Tensor | None, attention_mask: Tensor
) -> tuple[Encoded, Tensor | None]:
    """The image and text encoders and their ITC features; with ``mlm_ids``, the masked captions
    through the text-only layers too, in one batch of 2B rows with the originals (wider matrix
    products, one word-embedding gradient): returned second."""
    image_embeds = model.encode_image(images)  # [B, 1 + N, Dv]
    image_feat = model.image_feat(image_embeds)  # [B, E]
    B = input_ids.shape[0]
    if mlm_ids is None:
        text_embeds, mlm_text = model.encode_text(input_ids, attention_mask), None  # [B, L, H]
    else:
        both = model.encode_text(torch.cat([input_ids, mlm_ids]), attention_mask.repeat(2, 1))
        text_embeds, mlm_text = both[:B], both[B:]
    return Encoded(image_embeds, text_embeds, image_feat, model.text_feat(text_embeds, attention_mask)), mlm_text
