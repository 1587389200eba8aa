"""The parts of a training run, each built from the recipe by one function: the data stream, the
trainer (student, teacher and queue with their initial weights), and its wrapper over ranks.

:class:`~albef.training.loop.TrainRun` calls them in this order; each can be used alone, e.g.
to inspect a recipe's data without building a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from albef.checkpoints.loading import LoadReport, load_albef, load_hf_bert, load_timm_vit, read_state_dict
from albef.config import ALBEFConfig
from albef.data.annotations import BadSample, check_bad_share
from albef.data.pretrain import PretrainCollator
from albef.data.sampler import GlobalBatchSampler
from albef.data.transforms import train_transform
from albef.distributed import DistInfo, ensure_process_group
from albef.models.albef import checkpointed_parts
from albef.models.vit import VisionTransformer
from albef.recipes import Recipe, crop_scale_for
from albef.text import Tokenizer
from albef.training.fsdp import replicated_params, shard_trainer
from albef.training.momentum import copy_student_to_teacher
from albef.training.tasks import Task, text_max_length
from albef.training.trainer import Trainer

log = logging.getLogger("albef.train")


@dataclass
class TrainData:
    """What the loop iterates: ``loader`` yields micro-batches in the order ``sampler`` deals
    (``global_batch``, ``steps_per_epoch``, ``set_epoch``); ``bad``: entries skipped on reading."""

    loader: Any
    sampler: Any  # GlobalBatchSampler, or the ShardLoader that is both
    dataset: Dataset | None = None  # None for shards (they carry their own epoch)
    bad: list[BadSample] = field(default_factory=list)


def build_data(recipe: Recipe, task: Task, cfg: ALBEFConfig, tokenizer: Tokenizer, dist: DistInfo) -> TrainData:
    """The training stream: a JSON list through the task's dataset and the global-batch sampler,
    or WebDataset shards (``data.shards``); too many unreadable entries are an error now."""
    d, t = recipe.data, recipe.train
    # grounding resizes the whole image (the authors' transform): a crop could cut the referred object out
    crop = d.random_crop if d.random_crop is not None else recipe.task != "grounding"
    transform = train_transform(
        cfg.vision.image_size,
        crop_scale_for(recipe),
        d.randaugment,
        crop=crop,
        uint8_wrap=d.randaugment_wrap,
        flip=d.hflip,
    )
    if d.shards:
        return _shard_data(recipe, task, cfg, tokenizer, dist, transform)
    cleaning = d.text_cleaning or cfg.text_cleaning
    dataset, collate, bad = task.build_dataset(recipe, cfg, transform, tokenizer, cleaning)
    if dist.is_main:
        for b in bad[:20]:
            log.warning("skipped annotation %s", b)
    check_bad_share(len(bad), len(dataset) + len(bad), d.max_bad_fraction, bad, "annotation entries")
    sampler = GlobalBatchSampler(
        len(dataset), t.batch_size, dist.world_size, dist.rank, t.grad_accum, t.seed, group_size=d.group_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate,
        pin_memory=dist.device.type == "cuda",
    )
    return TrainData(loader, sampler, dataset, bad)


def _shard_data(
    recipe: Recipe, task: Any, cfg: ALBEFConfig, tokenizer: Tokenizer, dist: DistInfo, transform
) -> TrainData:
    from albef.data.shards import ShardLoader  # webdataset: imported only by runs that read shards

    d, t = recipe.data, recipe.train
    if task.name not in ("pretrain", "retrieval"):
        raise ValueError(f"data.shards feeds image-caption tasks (pretrain, retrieval), not {task.name!r}")
    loader = ShardLoader(
        d.shards,
        transform,
        PretrainCollator(tokenizer, text_max_length(task.name, cfg, d.truncate_text)),
        t.batch_size,
        dist.world_size,
        dist.rank,
        t.grad_accum,
        t.seed,
        d.epoch_samples,
        d.resampled,
        d.shuffle_buffer,
        d.num_workers,
        d.load_truncated_images,
    )
    return TrainData(loader, loader)  # shards were cleaned when they were written


def build_trainer(
    recipe: Recipe, task: Task, cfg: ALBEFConfig, global_batch: int, dist: DistInfo
) -> tuple[Trainer, LoadReport | None]:
    """The task's trainer on the run's device, with its initial weights (``model.init``, then
    ``model.text_init`` / ``model.vision_init``), gradient checkpointing and compile applied.
    Returns it and the report of the ``model.init`` load (None without one)."""
    r, t = recipe, recipe.train
    trainer = task.build_trainer(cfg, r)
    if trainer.queue is not None and cfg.queue_size % global_batch:
        raise ValueError(
            f"queue_size {cfg.queue_size} is not a multiple of the global batch {global_batch} "
            f"({t.batch_size} per rank x {dist.world_size} ranks x {t.grad_accum} "
            "accumulation steps); change one of them"
        )
    report = None
    if r.model.init:
        teacher_from = "built" if t.teacher_init == "authors" else "student"
        report = load_albef(trainer, read_state_dict(r.model.init), r.model.init, teacher_from=teacher_from)
        if dist.is_main:
            log.info("%s", report)
            encoders = [k for k in report.teacher_as_built if "_encoder." in k or ".text_decoder." in k]  # not heads
            if encoders:
                log.warning(
                    "%s has no momentum copies of %d teacher encoder tensors (%s): as in the authors' "
                    "scripts, the teacher starts from the model as built before loading and reaches the "
                    "student only through the EMA; train.teacher_init=student starts it from the loaded student",
                    r.model.init,
                    len(encoders),
                    ", ".join(encoders[:3]) + (", ..." if len(encoders) > 3 else ""),
                )
    student, teacher = trainer.model, trainer.model_m
    for source, load in ((r.model.text_init, load_hf_bert), (r.model.vision_init, load_timm_vit)):
        if source:
            loaded = load(student, source)
            if dist.is_main:
                log.info("%s", loaded)
    if (r.model.text_init or r.model.vision_init) and teacher is not None:
        if not r.model.init:  # the authors: load BERT / DeiT into the student, then teacher = student
            copy_student_to_teacher(student, teacher)
        else:  # on top of a checkpoint: only the encoders just replaced, the loaded teacher stays
            for source, part in ((r.model.text_init, "text_encoder"), (r.model.vision_init, "visual_encoder")):
                if source:
                    copy_student_to_teacher(getattr(student, part), getattr(teacher, part))
    trainer.to(dist.device)
    vision_ckpt, text_ckpt = checkpointed_parts(t.grad_checkpointing)
    for m in trainer.encoders():
        m.grad_checkpointing = vision_ckpt if isinstance(m, VisionTransformer) else text_ckpt
        if t.compile:
            m.compile()
    return trainer, report


def wrap_trainer(trainer: Trainer, recipe: Recipe, precision: str, dist: DistInfo) -> tuple[nn.Module, list]:
    """What the step calls: the trainer itself on one process, DDP over ranks, or the trainer
    sharded in place with FSDP (``train.fsdp``). Returns it and, under FSDP, the replicated
    parameters whose gradients the loop averages itself."""
    if recipe.train.fsdp:
        if precision == "fp16":  # the GradScaler would unscale sharded and replicated grads together
            raise ValueError("train.precision=fp16 is not supported with train.fsdp; use bf16")
        ensure_process_group(dist.device)
        shard_trainer(trainer, dist.device.type)
        return trainer, replicated_params(trainer.model)
    if dist.world_size == 1:
        return trainer, []
    ddp = DistributedDataParallel(
        trainer,
        device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
        broadcast_buffers=False,  # the queues stay equal via all-gather
    )
    return ddp, []
