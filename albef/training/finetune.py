"""Fine-tuning objectives with momentum distillation for VQA, SNLI-VE and NLVR2.

As in pretraining, the teacher is an EMA copy of the whole task model (the authors keep twins
of the image encoder, the text encoder and the task head or decoder), updated before use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.models.tasks import ALBEFForClassification, ALBEFForVQA, answer_nll
from albef.training.momentum import momentum_update
from albef.training.trainer import Trainer


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.grad = None
    return teacher.requires_grad_(False)


def soft_target_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float) -> Tensor:
    """``(1 − α)·CE(logits, labels) − α·mean_b Σ softmax(teacher)·log_softmax(logits)``."""
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None or alpha == 0:
        return ce
    # at least float32 also under autocast (CPU autocast keeps log_softmax / softmax in bfloat16)
    up = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731 (float64 stays)
    distill = -(F.log_softmax(up(logits), -1) * F.softmax(up(teacher_logits), -1)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * distill


@dataclass
class ClassifierOutput:
    loss: Tensor
    logits: Tensor
    logits_m: Tensor | None


class ClassifierTrainer(Trainer):
    """SNLI-VE / NLVR2 training step. ``lavis_teacher_text_encoder=True`` reproduces LAVIS 1.0.2's
    NLVR2 bug (the teacher branch runs the *student* text encoder); the authors' is the default."""

    def __init__(
        self,
        model: ALBEFForClassification,
        momentum: float = 0.995,
        distill: bool = True,
        lavis_teacher_text_encoder: bool = False,
    ):
        super().__init__(model, frozen_copy(model) if distill else None, momentum=momentum)
        self.lavis_teacher_text_encoder = lavis_teacher_text_encoder

    def forward(
        self,
        images: Tensor | list[Tensor],
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        alpha: float,
        update_momentum: bool = True,
    ) -> ClassifierOutput:
        """``update_momentum``: False on all but the first micro-batch of an accumulated step."""
        logits = self.model(images, input_ids, attention_mask)
        logits_m = None
        if self.model_m is not None:
            with torch.no_grad():
                if update_momentum:
                    momentum_update(self.model, self.model_m, self.momentum)
                t = self.model_m
                text_encoder = self.model.text_encoder if self.lavis_teacher_text_encoder else t.text_encoder
                hidden = text_encoder(input_ids, attention_mask, t.encode_images(images))
                logits_m = t.cls_head(hidden[:, 0])
        return ClassifierOutput(soft_target_loss(logits, labels, logits_m, alpha), logits, logits_m)


@dataclass
class VQAOutput:
    loss: Tensor
    per_answer_loss: Tensor  # [n_answers_total]
    question_states: Tensor
    logits: Tensor  # decoder logits [n_answers_total, La, V]


class VQATrainer(Trainer):
    """VQA training step: answers weighted (VQA: count / n; VG: 0.5), loss = Σ w·loss / B.

    ``label_smoothing``: 0 (authors) or 0.1 (LAVIS).
    """

    ENCODERS = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, model: ALBEFForVQA, momentum: float = 0.995, distill: bool = True, label_smoothing: float = 0.0):
        super().__init__(model, frozen_copy(model) if distill else None, momentum=momentum)
        self.label_smoothing = label_smoothing

    def forward(
        self,
        images: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        weights: Tensor,
        n_answers: Tensor,
        alpha: float,
        update_momentum: bool = True,
    ) -> VQAOutput:
        """``answer_ids`` hold every question's answers, question by question (``n_answers`` each)."""
        q = self.model.encode_question(images, question_ids, question_mask)
        rows = torch.repeat_interleave(torch.arange(len(n_answers), device=q.device), n_answers.to(q.device))
        logits = self.model.answer_logits(answer_ids, answer_mask, q[rows], question_mask[rows])
        logits_m = None
        if self.model_m is not None:
            with torch.no_grad():
                if update_momentum:
                    momentum_update(self.model, self.model_m, self.momentum)
                if alpha > 0:
                    q_m = self.model_m.encode_question(images, question_ids, question_mask)
                    logits_m = self.model_m.answer_logits(answer_ids, answer_mask, q_m[rows], question_mask[rows])
        per_answer = answer_nll(
            logits, answer_ids, label_smoothing=self.label_smoothing, teacher_logits=logits_m, alpha=alpha
        )
        loss = (weights.to(per_answer.dtype) * per_answer).sum() / images.shape[0]
        return VQAOutput(loss, per_answer, q, logits)


class TextAssignmentTrainer(Trainer):
    """Cross-entropy of the 3-way text-assignment head (no momentum teacher, as the authors)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        logits, labels = self.model(images, input_ids, attention_mask, generator)
        return F.cross_entropy(logits, labels)
