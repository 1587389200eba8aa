"""Downstream models: VQA (answer decoder), SNLI-VE and NLVR2 (classifiers).

Parameter names follow the authors' fine-tuned checkpoints: ``visual_encoder``, ``text_encoder``,
``text_decoder`` (their ``text_decoder.bert``), ``decoder_head`` (their
``text_decoder.cls.predictions``), ``cls_head.{0,2}``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.config import ALBEFConfig
from albef.models.bert import MLMHead, TextEncoder
from albef.models.vit import VisionTransformer


def decoder_config(cfg: ALBEFConfig, num_layers: int | None = None):
    """The VQA decoder: BERT layers with cross-attention to the question states in every layer."""
    t = cfg.text
    return dataclasses.replace(t, num_layers=num_layers or t.num_layers - t.fusion_layer, fusion_layer=0,
                               encoder_width=t.hidden_size)


class ALBEFForVQA(nn.Module):
    """Question encoder (all text layers over the image) + causal answer decoder.

    Example:
        >>> from albef.config import get_preset
        >>> vqa = ALBEFForVQA(get_preset("albef-tiny"))
        >>> q = vqa.encode_question(torch.randn(1, 3, 32, 32), torch.tensor([[101, 2054]]), torch.ones(1, 2, dtype=torch.long))
        >>> q.shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, config: ALBEFConfig, decoder_layers: int | None = None):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(config.text)
        dec = decoder_config(config, decoder_layers)
        self.text_decoder = TextEncoder(dec, causal=True)
        self.decoder_head = MLMHead(dec)

    def encode_question(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, Lq, H] question states: the multimodal encoder over the question and the image."""
        return self.text_encoder(input_ids, attention_mask, self.visual_encoder(images))

    def answer_logits(self, answer_ids: Tensor, answer_mask: Tensor, question_states: Tensor,
                      question_mask: Tensor) -> Tensor:
        """Next-token logits [N, La, V] of answers given (repeated) question states."""
        hidden = self.text_decoder(answer_ids, answer_mask, question_states, question_mask)
        return self.decoder_head(hidden, self.text_decoder.embeddings.word_embeddings.weight)


def answer_nll(logits: Tensor, answer_ids: Tensor, pad_id: int = 0, label_smoothing: float = 0.0,
               teacher_logits: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Per-answer loss [N]: summed over answer tokens (position t predicts token t + 1).

    ``(1 − α)·Σ_t CE + α·Σ_t H(softmax(teacher), student)``; ``label_smoothing`` 0 is the authors',
    0.1 LAVIS's. The first position ([CLS], the start token) is never a target.
    """
    shifted = logits[:, :-1]
    labels = answer_ids[:, 1:].masked_fill(answer_ids[:, 1:] == pad_id, -100)
    ce = F.cross_entropy(shifted.transpose(1, 2), labels, reduction="none", label_smoothing=label_smoothing).sum(1)
    if teacher_logits is None or alpha == 0:
        return ce
    distill = -(F.log_softmax(shifted, -1) * F.softmax(teacher_logits[:, :-1], -1)).sum(-1)
    distill = (distill * (labels != -100)).sum(1)
    return (1 - alpha) * ce + alpha * distill


@torch.no_grad()
def rank_answers(model: ALBEFForVQA, question_states: Tensor, question_mask: Tensor, answer_ids: Tensor,
                 answer_mask: Tensor, k: int, scoring: str = "albef", label_smoothing: float = 0.0
                 ) -> dict[str, Tensor]:
    """Rank a fixed answer list for each question (the authors' two-stage procedure).

    Stage 1: the first answer token's probability picks ``k`` candidates. Stage 2: each
    candidate's full answer log-likelihood. ``scoring="albef"`` (default) scores
    ``log p(first token) − NLL(answer)`` — the first token counted twice, as the authors do —
    and softmaxes over the k; ``"corrected"`` counts it once (``−NLL``); ``"lavis"`` is
    ``−NLL`` too, with LAVIS's label smoothing passed in. Returns ``ranked_ids`` [B, k]
    (answer-list indices, best first), ``scores`` and the intermediate values.
    """
    if scoring not in ("albef", "corrected", "lavis"):
        raise ValueError(f"scoring must be 'albef', 'corrected' or 'lavis', not {scoring!r}")
    B = question_states.shape[0]
    k = min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(B, 1)  # [CLS] as the start token
    first_logits = model.answer_logits(start, torch.ones_like(start), question_states, question_mask)[:, 0]
    prob_first = first_logits.softmax(-1).index_select(1, answer_ids[:, 1])  # [B, n_answers]
    topk_probs, topk_ids = prob_first.topk(k, dim=1)
    cand_ids = answer_ids[topk_ids.reshape(-1)]  # question-major [B*k, La]
    cand_mask = answer_mask[topk_ids.reshape(-1)]
    q = question_states.repeat_interleave(k, 0)
    qm = question_mask.repeat_interleave(k, 0)
    logits = model.answer_logits(cand_ids, cand_mask, q, qm)
    nll = answer_nll(logits, cand_ids, label_smoothing=label_smoothing).view(B, k)
    if scoring == "albef":
        score = topk_probs.log() - nll
        probs, order = score.softmax(-1).topk(k, dim=1)
    else:
        score = -nll
        probs, order = score.topk(k, dim=1)
    return {"ranked_ids": topk_ids.gather(1, order), "scores": probs, "first_token_logits": first_logits,
            "prob_first_token": prob_first, "topk_probs": topk_probs, "topk_ids": topk_ids,
            "candidate_nll": nll, "log_probs_sum": score}


def share_cross_attention_kv(encoder: TextEncoder) -> None:
    """NLVR2: in each pair of fusion layers (f + 2i, f + 2i + 1) the first uses the second's
    cross-attention key and value projections (the same modules: one set of weights, two names)."""
    f, n = encoder.cfg.fusion_layer, encoder.cfg.num_layers
    for i in range((n - f) // 2):
        a = encoder.encoder.layer[f + 2 * i].crossattention.self
        b = encoder.encoder.layer[f + 2 * i + 1].crossattention.self
        a.key, a.value = b.key, b.value


class ALBEFForClassification(nn.Module):
    """Multimodal [CLS] -> Linear-ReLU-Linear classifier (SNLI-VE: 3 classes, one image).

    With ``num_images=2`` it is the NLVR2 model: every fusion layer is duplicated, the pair
    shares its cross-attention keys/values, and even/odd copies attend to image 0/1.
    """

    def __init__(self, config: ALBEFConfig, num_classes: int, num_images: int = 1):
        super().__init__()
        self.config = config
        self.num_images = num_images
        t = config.text
        if num_images == 2:
            t = dataclasses.replace(t, num_layers=t.fusion_layer + 2 * (t.num_layers - t.fusion_layer))
        elif num_images != 1:
            raise ValueError("num_images must be 1 (SNLI-VE) or 2 (NLVR2)")
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(t)
        if num_images == 2:
            share_cross_attention_kv(self.text_encoder)
        H = t.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, num_classes))

    def encode_images(self, images: Tensor | list[Tensor]) -> list[Tensor]:
        if self.num_images == 1:
            return [self.visual_encoder(images if isinstance(images, Tensor) else images[0])]
        both = self.visual_encoder(torch.cat(list(images)))  # one ViT pass over both images
        return list(both.chunk(2))

    def forward(self, images: Tensor | list[Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits [B, num_classes]; ``images`` is [B, 3, H, W] or a pair of them (NLVR2)."""
        hidden = self.text_encoder(input_ids, attention_mask, self.encode_images(images))
        return self.cls_head(hidden[:, 0])


class ALBEFForTextAssignment(nn.Module):
    """NLVR2's extra pretraining: given two images and a text, does the text describe the first,
    the second, or neither (labels 0, 1, 2)? The NLVR2 encoder layout with a 3-way linear head;
    ``vision_proj`` only ranks the negative images (it gets no gradient, so it is frozen)."""

    def __init__(self, config: ALBEFConfig):
        super().__init__()
        self.config = config
        base = ALBEFForClassification(config, 2, num_images=2)
        self.visual_encoder, self.text_encoder = base.visual_encoder, base.text_encoder
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim).requires_grad_(False)
        self.ta_head = nn.Linear(config.text.hidden_size, 3)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``images`` [B, 3, H, W], text b describes image b. Returns ``(logits [B, 3], labels [B])``."""
        embeds = self.visual_encoder(images)
        B = embeds.shape[0]
        with torch.no_grad():
            feat = F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)
            w = (feat @ feat.T / 0.07).softmax(1)
            w.fill_diagonal_(0)
            u = torch.rand(B, 2, generator=generator, device=embeds.device)
            two = (u[:, 0] <= 1 / 3) & (B >= 3)  # the authors: one negative with probability 2/3
            first = u[:, 1] > 0.5
            rows = torch.arange(B, device=embeds.device)
            neg = torch.multinomial(w, 2 if B >= 3 else 1, generator=generator) if B > 1 else rows[:, None]
            a = torch.where(two, neg[:, 0], torch.where(first, rows, neg[:, 0]))
            b = torch.where(two, neg[:, -1], torch.where(first, neg[:, 0], rows))
            labels = torch.where(two, 2, torch.where(first, 0, 1))
        hidden = self.text_encoder(input_ids, attention_mask, [embeds[a], embeds[b]])
        return self.ta_head(hidden[:, 0]), labels
