"""What differs between training tasks, behind one small interface the loop drives.

A task builds its trainer module and dataset, runs one micro-batch and finishes an optimizer
step (the feature queues are filled there, once per global batch). Everything else — ranks,
accumulation, schedules, checkpoints, bad data, logging — is the loop's.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from albef.config import ALBEFConfig
from albef.data.annotations import read_annotations
from albef.data.classification import read_classification
from albef.data.pretrain import PretrainCollator, PretrainDataset, parse_pretrain_entry
from albef.data.retrieval import RetrievalTrainDataset, read_retrieval_train
from albef.data.vqa import VQACollator, build_vqa_train_dataset
from albef.models.tasks import task_model
from albef.text import Tokenizer
from albef.training.finetune import ClassifierTrainer, TextAssignmentTrainer, VQATrainer
from albef.training.pretrain import ALBEFPretrainer
from albef.training.trainer import Trainer

#: the tasks whose training text the authors cut at ``max_text_len`` tokens (Pretrain.py,
#: Pretrain_nlvr.py: captions at 25; VQA.py: questions at 25); the others' training captions are
#: not cut (their tokenizer call has ``max_length`` but no ``truncation``)
TRUNCATED_TASKS = ("pretrain", "nlvr_pretrain", "vqa")


def text_max_length(task: str, cfg: ALBEFConfig, truncate: bool | None = None) -> int:
    """The token limit of a task's training text: ``cfg.max_text_len`` where the authors cut, else
    only BERT's position limit. ``truncate`` (``data.truncate_text``) True cuts every task at
    ``max_text_len``, False none of them."""
    cut = task in TRUNCATED_TASKS if truncate is None else truncate
    return cfg.max_text_len if cut else cfg.text.max_position_embeddings


class Task(Protocol):
    """What the loop asks of a task."""

    name: str
    loss_keys: tuple[str, ...]  # what :meth:`micro_step` logs; the first is the loss it returns

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        """The student, its teacher and queue (:class:`~albef.training.trainer.Trainer`)."""

    def build_dataset(
        self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str
    ) -> tuple[Any, Any, list]:
        """``(dataset, collate, skipped annotation entries)`` of ``recipe.data.train_files``."""

    def micro_step(
        self, module: nn.Module, batch: Any, alpha: float, generator: torch.Generator, first: bool
    ) -> tuple[Tensor, dict[str, Tensor | None], Any]:
        """One micro-batch through ``module`` (the trainer, or its DDP wrapper): ``(loss, logged
        losses, payload)``; ``first``: the step's first micro-batch updates the teacher."""

    def end_step(self, trainer: Trainer, payloads: list) -> None:
        """After the optimizer step, with every micro-batch's payload (pretraining: the queue)."""


class PretrainTask:
    """ITC + ITM + MLM with momentum distillation on image–caption pairs."""

    name = "pretrain"
    loss_keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        t = recipe.train
        return ALBEFPretrainer(
            task_model(self.name, cfg),
            hard_negative_eps=t.hard_negative_eps,
            itc=t.itc,
            hard_negatives=t.hard_negatives,
            itc_distill=t.itc_distill,
            mlm_distill=t.mlm_distill,
        )

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        records, bad = read_annotations(d.train_files, parse_pretrain_entry(d.image_root, d.max_words, cleaning))
        return (
            PretrainDataset(records, transform, seed=recipe.train.seed, truncated_ok=d.load_truncated_images),
            PretrainCollator(tokenizer, text_max_length(self.name, cfg, d.truncate_text)),
            bad,
        )

    def micro_step(
        self, module: nn.Module, batch: Any, alpha: float, generator: torch.Generator, first: bool
    ) -> tuple[Tensor, dict[str, Tensor | None], Any]:
        out = module(
            batch.images,
            batch.input_ids,
            batch.attention_mask,
            alpha=alpha,
            idx=batch.idx,
            generator=generator,
            update_momentum=first,
            enqueue=False,
        )
        losses = out.losses()
        payload = (out.teacher.image_feat, out.teacher.text_feat, batch.idx)  # enqueued by end_step
        return out.loss, {k: losses[k] for k in self.loss_keys}, payload

    def end_step(self, trainer: Trainer, payloads: list) -> None:
        image_feat, text_feat, idx = zip(*payloads, strict=True)
        trainer.queue.enqueue(torch.cat(image_feat), torch.cat(text_feat), None if idx[0] is None else torch.cat(idx))


class RetrievalTask(PretrainTask):
    """Retrieval fine-tuning: id-aware ITC (all captions of an image are positives) + ITM on hard
    negatives that exclude same-image entries, weighted ``softmax(sim)`` as the authors' (their
    ``softmax(sim + 1e-4)`` is the same distribution); the temperature is not clamped. Also the
    grounding fine-tuning objective (ITC + ITM)."""

    name = "retrieval"
    loss_keys = ("loss", "loss_itc", "loss_itm")

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        return ALBEFPretrainer(
            task_model(self.name, cfg),
            mlm=False,
            with_idx=True,
            hard_negative_eps=recipe.train.hard_negative_eps,
            clamp_temp=False,
        )

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        records, bad = read_retrieval_train(
            d.train_files, d.image_root, d.max_words, cleaning, grounding=recipe.task == "grounding"
        )
        return (
            RetrievalTrainDataset(records, transform, seed=recipe.train.seed, truncated_ok=d.load_truncated_images),
            PretrainCollator(tokenizer, text_max_length(self.name, cfg, d.truncate_text)),
            bad,
        )


class VQATask:
    """VQA fine-tuning: weighted answer likelihood with distillation (α ramp as configured)."""

    name = "vqa"
    loss_keys = ("loss",)

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        t = recipe.train
        return VQATrainer(
            task_model(self.name, cfg), cfg.momentum, distill=t.distill, label_smoothing=t.label_smoothing
        )

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        # "dataset": "vqa" entries' images under data.vqa_root, "vg" under data.vg_root (each
        # defaulting to data.image_root), as the authors' vqa_dataset joins them
        ds, bad = build_vqa_train_dataset(
            d.train_files,
            d.image_root,
            transform,
            recipe.train.seed,
            cleaning,
            vqa_root=d.vqa_root,
            vg_root=d.vg_root,
            truncated_ok=d.load_truncated_images,
            max_words=d.max_words,
        )
        return ds, VQACollator(tokenizer, text_max_length(self.name, cfg, d.truncate_text)), bad

    def micro_step(self, module, batch, alpha, generator, first):
        out = module(
            batch.images,
            batch.question_ids,
            batch.question_mask,
            batch.answer_ids,
            batch.answer_mask,
            batch.weights,
            batch.n_answers,
            alpha=alpha,
            update_momentum=first,
        )
        return out.loss, {"loss": out.loss}, None

    def end_step(self, trainer, payloads) -> None:
        return None


class ClassifyTask:
    """SNLI-VE (``{"image", "sentence", "label"}``, 3 classes) and NLVR2 (``{"images": [a, b],
    "sentence", "label": "True"|"False"}``) with distillation."""

    loss_keys = ("loss",)

    def __init__(self, name: str):
        self.name = name
        self.num_images = 2 if name == "nlvr" else 1

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        t = recipe.train
        return ClassifierTrainer(
            task_model(self.name, cfg),
            cfg.momentum,
            distill=t.distill,
            lavis_teacher_text_encoder=t.lavis_teacher_text_encoder,
        )

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        records, bad = read_classification(d.train_files, d.image_root, self.name, cleaning, d.max_words)
        return (
            PretrainDataset(records, transform, seed=recipe.train.seed, truncated_ok=d.load_truncated_images),
            PretrainCollator(tokenizer, text_max_length(self.name, cfg, d.truncate_text)),
            bad,
        )

    def images(self, batch: Any):
        return batch.images if self.num_images == 1 else [batch.images[:, 0], batch.images[:, 1]]

    def micro_step(self, module, batch, alpha, generator, first):
        out = module(
            self.images(batch), batch.input_ids, batch.attention_mask, batch.labels, alpha=alpha, update_momentum=first
        )
        return out.loss, {"loss": out.loss}, None

    def end_step(self, trainer, payloads) -> None:
        return None


class TextAssignmentTask(PretrainTask):
    """NLVR2's text-assignment pretraining on image–caption pairs (3-way, no distillation)."""

    name = "nlvr_pretrain"
    loss_keys = ("loss",)

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> Trainer:
        return TextAssignmentTrainer(task_model(self.name, cfg))

    def micro_step(self, module, batch, alpha, generator, first):
        loss = module(batch.images, batch.input_ids, batch.attention_mask, generator=generator)
        return loss, {"loss": loss}, None

    def end_step(self, trainer, payloads) -> None:
        return None


TASKS = {
    "pretrain": PretrainTask,
    "retrieval": RetrievalTask,
    "grounding": RetrievalTask,
    "vqa": VQATask,
    "ve": lambda: ClassifyTask("ve"),
    "nlvr": lambda: ClassifyTask("nlvr"),
    "nlvr_pretrain": TextAssignmentTask,
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
