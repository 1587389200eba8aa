"""The pretraining wrapper: ITC + ITM + MLM with momentum distillation.

:class:`ALBEFPretrainer` owns the training-only state (momentum teacher, feature queues) around
an inference :class:`~albef.models.albef.ALBEF`. One ``forward`` is one reference step, in the
reference's order: momentum update, momentum features, ITC against the queues as they were,
enqueue, ITM on hard negatives, MLM. Three things differ, for speed: the MLM masks are drawn
first (so one seed gives other draws than the reference's; ``draws`` replays any); the masked
captions share the text-only layers' pass with the originals, in student and teacher; and the
student's ITM pairs and masked captions share one fusion pass (same values up to float
rounding; dropout draws differ). With image ids
(``idx``) it is the retrieval fine-tuning objective instead (id-aware ITC targets and queue,
same-id entries never negatives); with ``mlm=False`` the MLM term is left out.

Example:
    >>> from albef.config import get_preset
    >>> from albef.models.albef import ALBEF
    >>> trainer = ALBEFPretrainer(ALBEF(get_preset("albef-tiny")))
    >>> ids = torch.tensor([[101, 1037, 3899, 2003], [101, 1037, 4937, 0]])
    >>> out = trainer(torch.randn(2, 3, 32, 32), ids, (ids > 0).long(), alpha=0.4)
    >>> out.loss.backward()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.models.albef import ALBEF
from albef.models.bert import ImageContext, set_unpad
from albef.models.tied import TiedGrad
from albef.training.momentum import FeatureQueue, make_teacher, momentum_update
from albef.training.objectives import (IGNORE_INDEX, hard_negative_weights, itc_loss, mask_tokens,
                                       mlm_loss, sample_hard_negatives)

CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0
MLMRows = tuple[Tensor, "Tensor | None", Tensor]  # (masked [B, L], positions [B, P] or None, keep)


@dataclass
class PretrainDraws:
    """Random choices of one step, to replay a run exactly. Any field may be left None."""

    neg_image_idx: Tensor | None = None  # [B] negative image of each text (-1: none)
    neg_text_idx: Tensor | None = None  # [B] negative text of each image
    mlm_input_ids: Tensor | None = None  # [B, L] masked ids
    mlm_labels: Tensor | None = None  # [B, L] original ids where masked, -100 elsewhere


@dataclass
class PretrainOutput:
    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_mlm: Tensor | None
    alpha: float
    # intermediate values (references, no extra memory): for logging, tests and parity
    image_embeds: Tensor
    text_embeds: Tensor
    image_feat: Tensor
    text_feat: Tensor
    image_embeds_m: Tensor
    text_embeds_m: Tensor
    image_feat_m: Tensor
    text_feat_m: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor
    sim_i2t_m: Tensor
    sim_t2i_m: Tensor
    targets_i2t: Tensor
    targets_t2i: Tensor
    weights_i2t: Tensor  # hard-negative weights, [B, B]
    weights_t2i: Tensor
    draws: PretrainDraws  # what was actually used
    # [B + n_neg_img + n_neg_txt, 1, H] (the [CLS]; [.., L, H] with full_hidden): positives,
    # (text, neg image), (neg text, image)
    fused: Tensor
    itm_logits: Tensor
    itm_labels: Tensor
    mlm_logits: Tensor | None = None  # [n_masked, V] at labels != -100 (row-major)
    mlm_logits_m: Tensor | None = None
    mlm_ce: Tensor | None = None
    mlm_distill: Tensor | None = None


class ALBEFPretrainer(nn.Module):
    """Training-time ALBEF: the student, its momentum teacher and the feature queues."""

    def __init__(self, model: ALBEF, mlm: bool = True, with_idx: bool = False,
                 hard_negative_eps: float = 0.0, clamp_temp: bool = True, itc: bool = True,
                 hard_negatives: bool = True, itc_distill: bool = True, mlm_distill: bool = True,
                 full_hidden: bool = False):
        """``itc`` .. ``mlm_distill`` switch the paper's ablation rows: ``itc=False`` leaves the ITC
        loss out (and ITM negatives are then random); ``hard_negatives=False`` draws ITM negatives
        uniformly; ``itc_distill`` / ``mlm_distill`` turn momentum distillation off per objective.

        The losses read the fused [CLS] (ITM) and the masked positions (MLM) only, so by default
        the last layer is computed for those alone (same values, less work);
        ``full_hidden=True`` computes every position, padding included, as the reference does
        (``out.fused`` is then [N, L, H]; parity): it switches the model's text encoders to
        ``unpad = False`` for good. By default they skip padding
        (:class:`~albef.models.bert.Packing`), whose hidden states then come back as zeros."""
        super().__init__()
        cfg = model.config
        if mlm and model.mlm_head is None:
            raise ValueError("MLM pretraining needs a model built with an MLM head")
        self.model = model
        self.model_m = make_teacher(model)
        if not mlm:
            self.model_m.mlm_head = None
        self.queue = FeatureQueue(cfg.embed_dim, cfg.queue_size, with_idx=with_idx)
        self.momentum = cfg.momentum
        self.mlm = mlm
        self.mlm_probability = cfg.mlm_probability
        self.hard_negative_eps = hard_negative_eps
        self.clamp_temp = clamp_temp  # the authors' pretraining clamps it each step; their retrieval model does not
        self.use_itc, self.hard_negatives = itc, hard_negatives
        self.itc_distill, self.mlm_distill = itc_distill, mlm_distill
        self.full_hidden = full_hidden
        if full_hidden:
            set_unpad(self, False)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float,
                idx: Tensor | None = None, draws: PretrainDraws | None = None,
                generator: torch.Generator | None = None, update_momentum: bool = True,
                enqueue: bool = True) -> PretrainOutput:
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
        temp = model.temp

        # The MLM inputs are drawn first: the masked captions go through the text-only layers
        # in one batch with the originals (same weights, same padding), in student and teacher.
        mlm_ids = labels = None
        if self.mlm:
            mlm_ids, labels = self._mlm_inputs(input_ids, draws, generator)
        teacher_mlm = self.mlm and self.mlm_distill and alpha > 0

        image_embeds = model.encode_image(images)  # [B, 1+N, Dv]
        image_feat = model.image_feat(image_embeds)  # [B, E]
        # The lookup and the MLM decoder share the word-embedding table: one gradient, made at the end
        tie = TiedGrad() if self.mlm else None
        text_embeds, mlm_text = _text_layers(model, input_ids, mlm_ids, attention_mask, tie)  # [B, L, H] each
        text_feat = model.text_feat(text_embeds, attention_mask)

        with torch.no_grad():
            if update_momentum:
                momentum_update(model, teacher, self.momentum)
            image_embeds_m = teacher.encode_image(images)
            image_feat_m = teacher.image_feat(image_embeds_m)
            text_embeds_m, mlm_text_m = _text_layers(teacher, input_ids, mlm_ids if teacher_mlm else None,
                                                     attention_mask)
            text_feat_m = teacher.text_feat(text_embeds_m, attention_mask)

        q = self.queue
        image_queue, text_queue = q.image_queue, q.text_queue
        if enqueue and torch.is_grad_enabled():  # the backward reads the queues as they were before the enqueue below
            image_queue, text_queue = image_queue.clone(), text_queue.clone()
        itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                       alpha if self.itc_distill else 0.0, idx, None if idx is None else q.idx_queue)
        if enqueue:
            q.enqueue(image_feat_m, text_feat_m, idx)

        # ITM on contrastive hard negatives. One fusion pass over positives and both kinds of
        # negatives; the image keys/values are projected once and indexed.
        B = input_ids.shape[0]
        with torch.no_grad():
            if idx is None:
                positive = torch.eye(B, dtype=torch.bool, device=images.device)
            else:
                positive = idx.view(-1, 1) == idx.view(1, -1)
            if self.hard_negatives and self.use_itc:
                w_t2i = hard_negative_weights(itc.sim_t2i[:, :B], positive, self.hard_negative_eps)
                w_i2t = hard_negative_weights(itc.sim_i2t[:, :B], positive, self.hard_negative_eps)
            else:  # ablation: any non-positive entry, uniformly
                w_t2i = w_i2t = (~positive).to(itc.sim_t2i.dtype)
            neg_image = draws.neg_image_idx if draws.neg_image_idx is not None else sample_hard_negatives(w_t2i, generator)
            neg_text = draws.neg_text_idx if draws.neg_text_idx is not None else sample_hard_negatives(w_i2t, generator)
            neg_image, neg_text = neg_image.to(images.device), neg_text.to(images.device)
            rows = torch.arange(B, device=images.device)
            has_img, has_txt = neg_image >= 0, neg_text >= 0
            text_rows = torch.cat([rows, rows[has_img], neg_text[has_txt]])
            image_rows = torch.cat([rows, neg_image[has_img], rows[has_txt]])
            itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=images.device),
                                    torch.zeros(len(text_rows) - B, dtype=torch.long, device=images.device)])
        # ITM rows and MLM rows share one fusion pass: each fusion weight gets its gradient in one
        # piece (not summed over two passes, which also kept every fusion-layer gradient alive until
        # the second finished), and the matrix products are wider.
        context = model.image_context(image_embeds)
        mlm_rows = self._mlm_rows(labels) if self.mlm else None
        fused, mlm_hidden = self._fuse(text_embeds.index_select(0, text_rows), attention_mask.index_select(0, text_rows),
                                       image_rows, int(has_img.sum()), mlm_text, attention_mask, context, mlm_rows)
        itm_logits = model.itm_logits(fused)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        out = PretrainOutput(
            loss=(itc.loss if self.use_itc else 0.0) + loss_itm, loss_itc=itc.loss, loss_itm=loss_itm,
            loss_mlm=None, alpha=alpha,
            image_embeds=image_embeds, text_embeds=text_embeds, image_feat=image_feat, text_feat=text_feat,
            image_embeds_m=image_embeds_m, text_embeds_m=text_embeds_m, image_feat_m=image_feat_m,
            text_feat_m=text_feat_m, sim_i2t=itc.sim_i2t, sim_t2i=itc.sim_t2i, sim_i2t_m=itc.sim_i2t_m,
            sim_t2i_m=itc.sim_t2i_m, targets_i2t=itc.targets_i2t, targets_t2i=itc.targets_t2i,
            weights_i2t=w_i2t, weights_t2i=w_t2i,
            draws=PretrainDraws(neg_image, neg_text), fused=fused, itm_logits=itm_logits, itm_labels=itm_labels)
        if self.mlm:
            self._mlm(out, mlm_ids, labels, mlm_hidden, mlm_rows, mlm_text_m, attention_mask, tie)
        return out

    def _mlm_inputs(self, input_ids: Tensor, draws: PretrainDraws,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if draws.mlm_input_ids is not None and draws.mlm_labels is not None:
            return draws.mlm_input_ids.to(input_ids.device), draws.mlm_labels.to(input_ids.device)
        return mask_tokens(input_ids, self.model.config.text.vocab_size, MASK_ID, (PAD_ID, CLS_ID),
                           self.mlm_probability, generator)

    def _mlm_rows(self, labels: Tensor) -> MLMRows:
        """``(masked [B, L], positions [B, P] or None, keep)``: the vocabulary projection runs only
        where a token is scored, and so (unless ``full_hidden``) does the last fusion layer."""
        masked = labels != IGNORE_INDEX
        positions, keep = (None, masked) if self.full_hidden else masked_positions(masked)
        return masked, positions, keep

    def _fuse(self, itm_text: Tensor, itm_mask: Tensor, image_rows: Tensor, n_neg_img: int,
              mlm_text: Tensor | None, attention_mask: Tensor, context: ImageContext,
              mlm_rows: MLMRows | None) -> tuple[Tensor, Tensor | None]:
        """The student's fusion pass over the ITM pairs (``itm_text`` [N, L, H]: positives,
        ``n_neg_img`` texts with negative images, then texts that are negatives of the images;
        images ``image_rows``) and, with ``mlm_text``, the masked captions with their own images,
        as one batch. Returns the ITM rows' output in that order ([N, 1, H], or [N, L, H] with
        ``full_hidden``) and the MLM rows' (at ``mlm_rows``' positions, or every position)."""
        model = self.model
        N = itm_text.shape[0]
        if mlm_text is None:
            fuse = model.fuse if self.full_hidden else model.itm_cls
            return fuse(itm_text, itm_mask, context.select(image_rows)), None
        B = mlm_text.shape[0]
        # Rows that read the B images in order go first, B at a time, so that the cross-attention
        # uses the images' keys/values as they are (ImageContext.tile: no gathered copies, no
        # scatter in the backward): positives, masked captions, and the negative texts when every
        # image has one. The negative images follow.
        tiled = N - B - n_neg_img == B
        pos, neg_img, neg_txt = slice(0, B), slice(B, B + n_neg_img), slice(B + n_neg_img, N)
        itm_order = [pos, neg_txt, neg_img] if tiled else [pos, neg_img, neg_txt]

        def arrange(itm: Tensor, mlm: Tensor) -> Tensor:  # ITM rows in itm_order, MLM rows second
            parts = [itm[sl] for sl in itm_order]
            return torch.cat([parts[0], mlm, *parts[1:]])

        positions = mlm_rows[1]
        if positions is not None:  # the ITM rows read their [CLS] alone: position 0, then none (-1)
            itm = positions.new_full((N, positions.shape[1]), -1)
            itm[:, 0] = 0
            positions = arrange(itm, positions)
        extra = image_rows[neg_img] if tiled else image_rows[B:]
        hidden = model.fuse(arrange(itm_text, mlm_text), arrange(itm_mask, attention_mask),
                            context.tile(3 if tiled else 2, extra), positions=positions)
        rest = hidden[2 * B:]  # back to positives, negative images, negative texts
        itm_hidden = torch.cat([hidden[:B], rest[B:], rest[:B]]) if tiled else torch.cat([hidden[:B], rest])
        return (itm_hidden if positions is None else itm_hidden[:, :1]), hidden[B:2 * B]

    def _mlm(self, out: PretrainOutput, ids: Tensor, labels: Tensor, hidden: Tensor, mlm_rows: MLMRows,
             text_m: Tensor | None, attention_mask: Tensor, tie: TiedGrad | None) -> None:
        """``hidden``: the student's fused masked captions (from :meth:`_fuse`); ``text_m``: the
        masked captions after the teacher's text-only layers, None when the teacher's MLM pass is
        off (no distillation)."""
        model, teacher = self.model, self.model_m
        masked, positions, keep = mlm_rows
        logits = model.mlm_logits(hidden[keep], tie)  # [n_masked, V], row-major like hidden[masked]
        logits_m = None
        alpha = out.alpha if self.mlm_distill else 0.0
        if text_m is not None:  # decided once, in forward (teacher_mlm)
            with torch.no_grad():
                hidden_m = teacher.fuse(text_m, attention_mask, out.image_embeds_m, positions=positions)
                logits_m = teacher.mlm_logits(hidden_m[keep])
        loss, ce, distill = mlm_loss(logits, labels[masked], logits_m, alpha)
        out.loss = out.loss + loss
        out.loss_mlm, out.mlm_ce, out.mlm_distill = loss, ce, distill
        out.mlm_logits, out.mlm_logits_m = logits, logits_m
        out.draws.mlm_input_ids, out.draws.mlm_labels = ids, labels


def _text_layers(model: ALBEF, input_ids: Tensor, mlm_ids: Tensor | None,
                 attention_mask: Tensor, tie: TiedGrad | None = None) -> tuple[Tensor, Tensor | None]:
    """The text-only layers over the captions and, when given, their masked copies: one batch
    of 2B rows instead of two passes of B (wider matrix products, one word-embedding gradient)."""
    if mlm_ids is None:
        return model.encode_text(input_ids, attention_mask, tie), None
    B = input_ids.shape[0]
    both = model.encode_text(torch.cat([input_ids, mlm_ids]), attention_mask.repeat(2, 1), tie)
    return both[:B], both[B:]


def masked_positions(masked: Tensor) -> tuple[Tensor, Tensor]:
    """``(positions [B, P], keep [B, P])`` with P the most masked tokens of a row: each row's masked
    positions in ascending order, padded with -1 (``keep`` is ``positions >= 0``);
    ``hidden_at_positions[keep]`` equals ``hidden[masked]``."""
    B, L = masked.shape
    counts = masked.sum(1)
    P = max(1, int(counts.max()))
    key = torch.arange(L, device=masked.device) + L * (~masked).long()  # masked first, in order
    positions = key.argsort(dim=1)[:, :P]
    keep = torch.arange(P, device=masked.device) < counts[:, None]
    return positions.masked_fill(~keep, -1), keep
