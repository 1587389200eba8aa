"""What differs between training tasks, behind one small interface the loop drives.

A task builds its trainer module and dataset, runs one micro-batch and finishes an optimizer
step (the feature queues are filled there, once per global batch). Everything else — ranks,
accumulation, schedules, checkpoints, bad data, logging — is the loop's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from albef.config import ALBEFConfig
from albef.data.annotations import BadSample, read_annotations
from albef.data.pretrain import PretrainCollator, PretrainDataset, parse_pretrain_entry
from albef.data.retrieval import RetrievalTrainDataset, read_retrieval_train
from albef.models.albef import ALBEF
from albef.text import Tokenizer
from albef.training.pretrain import ALBEFPretrainer


class PretrainTask:
    """ITC + ITM + MLM with momentum distillation on image–caption pairs."""

    name = "pretrain"
    loss_keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> nn.Module:
        return ALBEFPretrainer(ALBEF(cfg), hard_negative_eps=_eps(recipe, 0.0))

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        records, bad = read_annotations(d.train_files, parse_pretrain_entry(d.image_root, d.max_words, cleaning))
        return PretrainDataset(records, transform, seed=recipe.train.seed), PretrainCollator(tokenizer, cfg.max_text_len), bad

    def micro_step(self, module: nn.Module, batch: Any, alpha: float, generator: torch.Generator, first: bool
                   ) -> tuple[Tensor, dict[str, Tensor | None], Any]:
        out = module(batch.images, batch.input_ids, batch.attention_mask, alpha=alpha, idx=batch.idx,
                     generator=generator, update_momentum=first, enqueue=False)
        logs = {k: getattr(out, k) for k in self.loss_keys}
        return out.loss, logs, (out.image_feat_m, out.text_feat_m, batch.idx)

    def end_step(self, trainer: nn.Module, payloads: list) -> None:
        image_feat, text_feat, idx = zip(*payloads)
        trainer.queue.enqueue(torch.cat(image_feat), torch.cat(text_feat), None if idx[0] is None else torch.cat(idx))


class RetrievalTask(PretrainTask):
    """Retrieval fine-tuning: id-aware ITC (all captions of an image are positives) + ITM on hard
    negatives that exclude same-image entries; the authors add 1e-4 to the negative weights and
    do not clamp the temperature. Also the grounding fine-tuning objective (ITC + ITM)."""

    name = "retrieval"
    loss_keys = ("loss", "loss_itc", "loss_itm")

    def build_trainer(self, cfg: ALBEFConfig, recipe: Any) -> nn.Module:
        return ALBEFPretrainer(ALBEF(cfg, mlm_head=False), mlm=False, with_idx=True,
                               hard_negative_eps=_eps(recipe, 1e-4), clamp_temp=False)

    def build_dataset(self, recipe: Any, cfg: ALBEFConfig, transform, tokenizer: Tokenizer, cleaning: str):
        d = recipe.data
        records, bad = read_retrieval_train(d.train_files, d.image_root, d.max_words, cleaning,
                                            grounding=recipe.task == "grounding")
        return (RetrievalTrainDataset(records, transform, seed=recipe.train.seed),
                PretrainCollator(tokenizer, cfg.max_text_len), bad)


def _eps(recipe: Any, default: float) -> float:
    eps = recipe.train.hard_negative_eps
    return default if eps is None else eps


TASKS: dict[str, type] = {"pretrain": PretrainTask, "retrieval": RetrievalTask, "grounding": RetrievalTask}


def get_task(name: str):
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


__all__ = ["BadSample", "PretrainTask", "RetrievalTask", "get_task", "TASKS"]
