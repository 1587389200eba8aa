"""The pretraining loop: one process or many (torchrun), CPU or GPU, resumable to the sample.

Determinism is by construction: the data order comes from :class:`GlobalBatchSampler`, every
sample's augmentation from its own seed, and every micro-batch's random draws (hard negatives,
masking, dropout) from a seed derived from ``(seed, epoch, step, micro-batch)``. Hence a resumed
run continues exactly where it stopped, and one process with gradient accumulation ``k``
computes what ``k`` processes compute together.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from albef.checkpoints.files import (
    BEST_NAME,
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    clean_stale_temp_files,
    load_checkpoint,
    save_checkpoint,
)
from albef.checkpoints.loading import load_albef, load_hf_bert, load_timm_vit, read_state_dict
from albef.config import ALBEFConfig
from albef.data.annotations import BadSample, check_bad_share
from albef.data.sampler import GlobalBatchSampler
from albef.data.transforms import train_transform
from albef.models.albef import checkpointed_parts
from albef.models.vit import VisionTransformer
from albef.precision import autocast_dtype, resolve_precision
from albef.recipes import PretrainRecipe
from albef.seeding import SEED_RULE, mix_seed
from albef.text import Tokenizer
from albef.training.checkpoint import check_output_dir, delete_run_files, rng_state, set_rng_state
from albef.training.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    ensure_process_group,
    init_distributed,
)
from albef.training.heap import release_after_step
from albef.training.metrics import MetricsLogger, plot_losses
from albef.training.momentum import copy_student_to_teacher, momentum_update
from albef.training.schedule import LRSchedule, alpha_at
from albef.training.tasks import get_task, text_max_length
from albef.training.validation import Validator

log = logging.getLogger("albef.train")


def _under(name: str, prefix: str) -> bool:  # "a.b" is under "a" and "a.b", not under "a.bc"
    return name == prefix.rstrip(".") or name.startswith(prefix.rstrip(".") + ".")


def lr_scale_of(name: str, lr_scale: dict[str, float] | None) -> float:
    """The multiplier of the parameter ``name``: the value of the longest matching prefix, else 1."""
    hits = [k for k in (lr_scale or {}) if _under(name, k)]
    return lr_scale[max(hits, key=len)] if hits else 1.0


def _multiplier(prefix: str, v: Any) -> float:
    if isinstance(v, dict):  # train.lr_scale.text_encoder.embeddings=0.1 nests at each dot
        raise ValueError(
            f"train.lr_scale[{prefix!r}] is a mapping: give the prefix whole, "
            "e.g. train.lr_scale='{text_encoder.embeddings: 0.1}'"
        )
    try:
        x = float(v)  # YAML may hand "1e-1" over as a string
    except (TypeError, ValueError):
        x = math.nan
    if not 0 <= x < math.inf:
        raise ValueError(f"train.lr_scale[{prefix!r}] = {v!r}: give a finite multiplier >= 0")
    return x


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    in_backward: bool = False,
    lr_scale: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW with the reference's groups: no decay for 1-D tensors and biases, decay for the rest.

    ``in_backward``: :class:`albef.training.optim.AdamWInBackward` (the same update, applied during
    the backward as gradients complete, a few tensors at a time, and those gradients freed).

    ``lr_scale`` (``train.lr_scale``): parameter-name prefix -> multiplier of the scheduled learning
    rate (the longest prefix wins), kept in each group as ``lr_scale``; e.g.
    ``{"text_encoder.encoder.layer.0": 0.1}``. Empty (the reference): one rate for every parameter.

    As in the reference (timm's factory called on the top-level model, which names no exceptions),
    ``pos_embed``, ``cls_token`` and the 0-dim ``temp`` are decayed.

    >>> opt = build_optimizer(model, lr=1e-4, weight_decay=0.02, lr_scale={"text_encoder": 0.1})  # doctest: +SKIP
    """
    checked = {prefix: _multiplier(prefix, v) for prefix, v in (lr_scale or {}).items()}
    for prefix in checked:
        if not any(_under(n, prefix) for n, _ in model.named_parameters()):
            raise ValueError(
                f"train.lr_scale: no parameter name starts with {prefix!r} "
                f"(names look like {next(n for n, _ in model.named_parameters())!r})"
            )
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (not (p.ndim == 1 or name.endswith(".bias")), lr_scale_of(name, checked))
            groups.setdefault(key, []).append(p)
    # The fused kernel (one pass over each tensor instead of a chain of foreach ops) computes the
    # same update; on 2 CPU cores it takes the AdamW step of albef-base from 0.53 s to 0.13 s.
    from albef.training.fsdp import is_sharded

    params = [p for ps in groups.values() for p in ps]
    sharded = any(is_sharded(p) for p in params)  # FSDP: sharded and replicated tensors can't share a kernel
    fused = (
        not sharded and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    )
    from albef.training.optim import AdamWInBackward

    cls = AdamWInBackward if in_backward else torch.optim.AdamW
    # the reference's two groups (no decay first) when nothing is scaled; state dicts match it then
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[1], k[0]))
    param_groups = [
        {"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1]} for k in order
    ]
    if not groups:
        param_groups = [{"params": [], "weight_decay": 0.0, "lr_scale": 1.0}]
    return cls(param_groups, lr=lr, fused=fused or None, foreach=False if sharded else None)


def full_train_state(trainer: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (the optimizer's keyed by parameter name), the
    same whether the run is sharded or not, so any number of ranks can resume from them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(trainer, options=opts),
        get_optimizer_state_dict(trainer.model, optimizer, options=opts),
    )


def load_train_state(trainer: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(trainer, ckpt["model"], options=opts)
    state = ckpt["optimizer"].get("state", {})
    if state and all(isinstance(k, int) for k in state):  # a checkpoint from before name-keyed states
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        set_optimizer_state_dict(trainer.model, optimizer, ckpt["optimizer"], options=opts)


def micro_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """The seed of one micro-batch's random draws (dropout, MLM masks, hard negatives); ``micro``
    numbers the micro-batches of a step across ranks."""
    return mix_seed("micro-batch", seed, epoch, step, micro)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (Ampere and newer). PyTorch 1.7-1.11, the
    authors' 1.8 among them, enabled both by default; later versions enable neither."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class RunState:
    epoch: int = 0
    step_in_epoch: int = 0  # the next step to run
    global_step: int = 0
    samples_seen: int = 0
    bad_seen: int = 0
    best_metric: float | None = None  # the validation metric of the best epoch so far
    best_epoch: int | None = None  # its number, counted from 1


def load_trainer_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the student, teacher and queues of a run from its checkpoint.

    Example:
        >>> trainer = load_trainer_from_checkpoint("runs/pretrain/checkpoint_last.pt")  # doctest: +SKIP
        >>> model = trainer.model.eval()                                                 # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    recipe = PretrainRecipe.from_dict(ckpt["recipe"])
    trainer = get_task(recipe.task).build_trainer(ALBEFConfig.from_dict(ckpt["model_config"]), recipe)
    trainer.load_state_dict(ckpt["model"], strict=True)
    return trainer.to(device)


class PretrainRun:
    """Everything one pretraining run needs; :meth:`fit` runs it.

    ``resume``: True continues the run in ``output_dir`` (from its ``checkpoint_last.pt``, or
    ``checkpoint_prev.pt`` when the last is unreadable), a path continues from that checkpoint.
    ``overwrite``: start over in a folder that holds a run, deleting its checkpoints and logs;
    without it (or ``resume``) such a folder is an error, before any work.
    """

    def __init__(self, recipe: PretrainRecipe, resume: bool | str = False, overwrite: bool = False):
        self.recipe = recipe
        r, d, t = recipe, recipe.data, recipe.train
        self.out = Path(r.output_dir)
        check_output_dir(self.out, resume, overwrite)  # before any work or folder
        r.model.check_sources()
        self.dist: DistInfo = init_distributed(t.device)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in clean_stale_temp_files(self.out):  # left by writes that a kill interrupted
                log.warning("removed %s, a partial write of a killed run", tmp)
            if overwrite:
                delete_run_files(self.out)
        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts them)
        self.cfg = r.model.build_config()
        cleaning = d.text_cleaning or self.cfg.text_cleaning
        self.tokenizer = Tokenizer(add_sep=self.cfg.add_sep)

        self.task = get_task(r.task)
        # read before any training, so that a bad validation file fails now and not after an epoch
        self.validator = Validator.from_recipe(r, self.cfg, self.tokenizer)
        # grounding resizes the whole image (the authors' transform): a crop could cut the referred object out
        crop = d.random_crop if d.random_crop is not None else r.task != "grounding"
        transform = train_transform(
            self.cfg.vision.image_size,
            tuple(d.crop_scale),
            d.randaugment,
            crop=crop,
            uint8_wrap=d.randaugment_wrap,
            flip=d.hflip,
        )
        if d.shards:
            self._shard_source(transform)
        else:
            self.dataset, collate, self.ann_bad = self.task.build_dataset(
                r, self.cfg, transform, self.tokenizer, cleaning
            )
            n_entries = len(self.dataset) + len(self.ann_bad)
            if self.dist.is_main:
                for b in self.ann_bad[:20]:
                    log.warning("skipped annotation %s", b)
            check_bad_share(len(self.ann_bad), n_entries, d.max_bad_fraction, self.ann_bad, "annotation entries")
            self.sampler = GlobalBatchSampler(
                len(self.dataset),
                t.batch_size,
                self.dist.world_size,
                self.dist.rank,
                t.grad_accum,
                t.seed,
                group_size=d.group_size,
            )
            self.loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                num_workers=d.num_workers,
                collate_fn=collate,
                pin_memory=self.dist.device.type == "cuda",
            )

        self.trainer = self.task.build_trainer(self.cfg, r)
        model = self.trainer.model
        G = self.sampler.global_batch
        if hasattr(self.trainer, "queue") and self.cfg.queue_size % G:
            raise ValueError(
                f"queue_size {self.cfg.queue_size} is not a multiple of the global batch {G} "
                f"({t.batch_size} per rank x {self.dist.world_size} ranks x {t.grad_accum} "
                "accumulation steps); change one of them"
            )
        if r.model.init:
            self.init_report = load_albef(self.trainer, read_state_dict(r.model.init), r.model.init)
            if self.dist.is_main:
                log.info("%s", self.init_report)
        for source, loader in ((r.model.text_init, load_hf_bert), (r.model.vision_init, load_timm_vit)):
            if source:
                report = loader(model, source)
                if self.dist.is_main:
                    log.info("%s", report)
        teacher = getattr(self.trainer, "model_m", None)
        if (r.model.text_init or r.model.vision_init) and teacher is not None:
            if not r.model.init:  # the authors: load BERT / DeiT into the student, then teacher = student
                copy_student_to_teacher(model, teacher)
            else:  # on top of a checkpoint: only the encoders just replaced, the loaded teacher stays
                for source, part in ((r.model.text_init, "text_encoder"), (r.model.vision_init, "visual_encoder")):
                    if source and hasattr(teacher, part):
                        copy_student_to_teacher(getattr(model, part), getattr(teacher, part))
        self.trainer.to(self.dist.device)
        encoders = [
            m
            for owner in (model, getattr(self.trainer, "model_m", None))
            if owner is not None
            for m in (getattr(owner, n, None) for n in ("visual_encoder", "text_encoder", "text_decoder"))
            if m is not None
        ]
        vision_ckpt, text_ckpt = checkpointed_parts(t.grad_checkpointing)
        self.checkpointing = vision_ckpt or text_ckpt
        for m in encoders:
            m.grad_checkpointing = vision_ckpt if isinstance(m, VisionTransformer) else text_ckpt
        if t.compile:
            for m in encoders:
                m.compile()
        from albef.training.optim import resolve_in_backward  # before any wrapping or sharding work

        # fp32 | bf16 | fp16 for this device (auto: bf16 only on native-bf16 hardware), logged by the main rank
        self.precision = resolve_precision(t.precision, self.dist.device, "train.precision", report=self.dist.is_main)
        self.in_backward = resolve_in_backward(
            t.optimizer_in_backward, t.grad_accum, t.max_grad_norm, self.precision, self.dist.world_size, t.fsdp
        )
        self.fsdp, self.replicated = t.fsdp, []
        if t.fsdp:
            from albef.training.fsdp import replicated_params, shard_trainer

            if self.precision == "fp16":  # the GradScaler would unscale sharded and replicated grads together
                raise ValueError("train.precision=fp16 is not supported with train.fsdp; use bf16")
            ensure_process_group(self.dist.device)
            shard_trainer(self.trainer, self.dist.device.type)
            self.replicated = replicated_params(model)
            self.ddp = self.trainer
        else:
            self.ddp = (
                DistributedDataParallel(
                    self.trainer,
                    device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None,
                    broadcast_buffers=False,
                )  # queues stay equal via all-gather
                if self.dist.world_size > 1
                else self.trainer
            )
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay, in_backward=self.in_backward, lr_scale=t.lr_scale)
        cuda = self.dist.device.type == "cuda"
        if cuda:
            set_tf32(t.tf32)
        # autocast on CUDA and on the CPU (bf16); weights, gradients and AdamW state stay float32
        self.amp_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.precision == "fp16")
        self.schedule = LRSchedule(
            t.lr,
            t.min_lr,
            t.warmup_lr,
            t.warmup_epochs,
            t.epochs,
            style=t.schedule,
            warmup_steps=t.warmup_steps,
            steps_per_epoch=self.sampler.steps_per_epoch,
            total_steps=min(t.max_steps, t.epochs * self.sampler.steps_per_epoch) if t.max_steps else None,
        )
        self.state = RunState()
        # the step of the newest usable checkpoint_last.pt, which the next save keeps as checkpoint_prev.pt
        # (None: nothing written yet, or a damaged last that the next save replaces)
        self._saved_step: int | None = None
        if resume and self._resume(self.out / CHECKPOINT_NAME if resume is True else Path(resume)):
            self._saved_step = self.state.global_step
        self.metrics = MetricsLogger(
            self.out, enabled=self.dist.is_main, resume_step=self.state.global_step + 1
        )  # fresh runs drop stale rows
        self.bad_names: list[BadSample] = []

    def _shard_source(self, transform) -> None:
        """WebDataset shards instead of a JSON list (``data.shards``): pretraining and retrieval."""
        from albef.data.pretrain import PretrainCollator
        from albef.data.shards import ShardLoader

        d, t = self.recipe.data, self.recipe.train
        if self.task.name not in ("pretrain", "retrieval"):
            raise ValueError(f"data.shards feeds image-caption tasks (pretrain, retrieval), not {self.task.name!r}")
        self.dataset, self.ann_bad = None, []  # shards were cleaned when they were written
        self.sampler = self.loader = ShardLoader(
            d.shards,
            transform,
            PretrainCollator(self.tokenizer, text_max_length(self.task.name, self.cfg, d.truncate_text)),
            t.batch_size,
            self.dist.world_size,
            self.dist.rank,
            t.grad_accum,
            t.seed,
            d.epoch_samples,
            d.resampled,
            d.shuffle_buffer,
            d.num_workers,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def _resume(self, path: Path) -> bool:
        """Load the run's state from ``path`` (``checkpoint_prev.pt`` beside it when it is unreadable);
        True when ``path`` itself was loaded. An explicit path was checked by :func:`check_output_dir`."""
        previous = path.with_name(PREVIOUS_NAME) if path.name == CHECKPOINT_NAME else None
        if not path.exists() and not (previous and previous.exists()):
            if self.dist.is_main:
                log.warning("no checkpoint in %s yet: starting from scratch", path.parent)
            return False
        loaded_path = True
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as e:
            if previous is None or not previous.exists():
                raise
            if self.dist.is_main:  # a kill between the two renames, or a damaged file
                log.warning("%s; resuming from %s, the checkpoint before it", e, previous)
            path, ckpt, loaded_path = previous, load_checkpoint(previous), False
        if ckpt["model_config"] != self.cfg.to_dict():
            raise ValueError(f"{path} was written for another model config; resume it with its own recipe")
        saved_scale = ckpt.get("recipe", {}).get("train", {}).get("lr_scale") or {}
        if saved_scale != (self.recipe.train.lr_scale or {}):  # the optimizer's groups would not match
            raise ValueError(
                f"{path} was written with train.lr_scale {saved_scale}, this run has "
                f"{self.recipe.train.lr_scale or {}}: keep it as it was to resume"
            )
        load_train_state(self.trainer, self.optimizer, ckpt)
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler
            self.scaler.load_state_dict(ckpt["scaler"])
        self._check_geometry(ckpt.get("geometry"), path)
        self.state = RunState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d step %d", path, self.state.epoch, self.state.step_in_epoch)
        return loaded_path

    def _geometry(self) -> dict[str, Any]:
        t = self.recipe.train
        geometry = {
            "global_batch": self.sampler.global_batch,
            "steps_per_epoch": self.sampler.steps_per_epoch,
            "max_steps": t.max_steps,
            "schedule": t.schedule,
            "seed_rule": SEED_RULE,
        }
        if self.recipe.data.shards:  # the shard streams are dealt per rank and loader worker
            geometry["stream_slots"] = [self.dist.world_size, self.recipe.data.num_workers, t.batch_size]
        return geometry

    def _check_geometry(self, saved: dict | None, path: Path) -> None:
        """The data order and the schedule depend on the global batch: resuming with another one
        would silently train on a different stream; ranks x batch x accumulation may change."""
        rule = (saved or {}).get("seed_rule", 1)  # checkpoints from before albef/seeding.py: 1
        if rule != SEED_RULE and self.dist.is_main:
            log.warning(
                "%s was written by a version with seed rule %s, or before checkpoints recorded it (this "
                "one: %s): the run resumes, but from here on its sample order, augmentation and dropout "
                "are not what the uninterrupted run would have drawn (the rest of a half-done epoch may "
                "repeat some samples and skip others)",
                path,
                rule,
                SEED_RULE,
            )
        if not saved:  # checkpoints from before this check
            return
        now = self._geometry()
        for key in ("global_batch", "steps_per_epoch", "stream_slots"):
            if saved.get(key) != now.get(key):
                raise ValueError(
                    f"{path} was written with {key} {saved.get(key)}, this run has {now.get(key)}: "
                    "keep batch_size x ranks x grad_accum (and the data; for shards also the ranks, "
                    "data.num_workers and batch_size) as they were to resume"
                )
        if saved["max_steps"] != now["max_steps"] and now["schedule"] == "cosine" and self.dist.is_main:
            log.warning(
                "train.max_steps changed from %s to %s: the cosine schedule now ends elsewhere than in "
                "the run that wrote %s",
                saved["max_steps"],
                now["max_steps"],
                path,
            )

    def save(self, best: bool = False) -> None:
        """``checkpoint_last.pt``; with ``best`` the same state also as ``checkpoint_best.pt``."""
        if self.recipe.train.fsdp or self.dist.is_main:  # a collective under FSDP
            model_sd, optim_sd = full_train_state(self.trainer, self.optimizer)
        if self.dist.is_main:
            ckpt = {
                "format": "albef-train/1",
                "model": model_sd,
                "optimizer": optim_sd,
                "scaler": self.scaler.state_dict(),
                "state": vars(self.state).copy(),
                "rng": rng_state(),
                "geometry": self._geometry(),
                "scheduler": {"epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch},
                "recipe": self.recipe.to_dict(),
                "model_config": self.cfg.to_dict(),
            }
            # checkpoint_prev.pt keeps the last checkpoint of an earlier step (a save at the same step,
            # e.g. the epoch's end right after a checkpoint_every one, replaces the last in place)
            rotate = self._saved_step is not None and self._saved_step != self.state.global_step
            save_checkpoint(ckpt, self.out / CHECKPOINT_NAME, previous=self.out / PREVIOUS_NAME if rotate else None)
            self._saved_step = self.state.global_step
            if best:
                save_checkpoint(ckpt, self.out / BEST_NAME)
        barrier()

    def validate(self) -> bool:
        """Score the student on the validation split (every rank a share), log the metrics and say
        whether this epoch is the best so far. False without ``data.val_files``."""
        if self.validator is None:
            return False
        s = self.state
        metrics = self.validator(self.trainer.model, self.dist.device)
        score = metrics[self.validator.metric]
        improved = s.best_metric is None or score > s.best_metric  # the authors' strict ">"
        if improved:
            s.best_metric, s.best_epoch = score, s.epoch
        self.metrics.log(s.global_step, {**metrics, "epoch": s.epoch, "best_epoch": s.best_epoch}, split="val")
        if self.dist.is_main:
            tqdm.write(
                f"epoch {s.epoch} validation: {self.validator.metric} {score:.2f}"
                + (" (best)" if improved else f" (best {s.best_metric:.2f} at epoch {s.best_epoch})")
            )
        return improved

    # -- one optimizer step -----------------------------------------------------------------
    def _step(self, micro_batches: list, epoch: int, step: int) -> dict[str, float]:
        t, dev = self.recipe.train, self.dist.device
        lr = self.schedule(epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        alpha = alpha_at(t.alpha, epoch, step, self.sampler.steps_per_epoch, t.alpha_ramp_epochs)
        keys = self.task.loss_keys
        payloads, sums = [], torch.zeros(len(keys), dtype=torch.float64)
        for j, batch in enumerate(micro_batches):
            batch = batch.to(dev, non_blocking=True)
            seed = micro_seed(t.seed, epoch, step, self.dist.rank * t.grad_accum + j)
            torch.manual_seed(seed)  # dropout
            gen = torch.Generator(device=dev).manual_seed(seed)
            last = j == len(micro_batches) - 1
            sync = self.ddp.no_sync() if (self.ddp is not self.trainer and not last) else nullcontext()
            with sync:
                first = j == 0
                if first and self.fsdp and getattr(self.trainer, "model_m", None) is not None:
                    # the EMA on matching shards, before any FSDP unit gathers
                    momentum_update(self.trainer.model, self.trainer.model_m, self.trainer.momentum)
                    first = False
                with torch.autocast(
                    dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
                ):
                    loss, logs, payload = self.task.micro_step(self.ddp, batch, alpha, gen, first=first)
                self.scaler.scale(loss / len(micro_batches)).backward()  # outside autocast, as PyTorch advises
            payloads.append(payload)
            sums += torch.tensor(
                [float(logs[k].detach()) if logs[k] is not None else 0.0 for k in keys], dtype=torch.float64
            )
        if self.fsdp:  # FSDP reduced the sharded blocks' gradients; the replicated rest is averaged here
            from albef.training.fsdp import sync_replicated_grads

            sync_replicated_grads(self.replicated)
        grad_norm = math.nan  # before clipping; logged only when clipping computes it
        if t.max_grad_norm and self.fsdp:  # no fp16 under FSDP, so nothing to unscale
            from albef.training.fsdp import clip_grad_norm

            grad_norm = float(clip_grad_norm(self.trainer.model.parameters(), t.max_grad_norm))
        elif t.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainer.model.parameters(), t.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        release_after_step(dev.type == "cpu", self.checkpointing)  # freed heap back to the OS (heap.py)
        self.task.end_step(self.trainer, payloads)
        losses = all_reduce_mean((sums / len(micro_batches)).to(dev)).cpu()  # NCCL reduces device tensors only
        row = {**dict(zip(keys, losses.tolist(), strict=True)), "lr": lr, "alpha": alpha}
        if math.isfinite(grad_norm):  # not on an fp16 overflow step (the scaler skips it)
            row["grad_norm"] = grad_norm
        return row

    def _account_bad(self, micro_batches: list) -> None:
        d = self.recipe.data
        new_bad = [b for mb in micro_batches for b in mb.bad]
        dev = self.dist.device
        counts = all_reduce_sum(
            torch.tensor(
                [sum(mb.n_replaced for mb in micro_batches), sum(len(mb.index) for mb in micro_batches), len(new_bad)],
                dtype=torch.float64,
                device=dev,
            )
        ).cpu()
        self.state.bad_seen += int(counts[0])
        self.state.samples_seen += int(counts[1])
        if counts[2] > 0:
            gathered: list[Any] = [new_bad]
            if self.dist.enabled and self.dist.world_size > 1:
                gathered = [None] * self.dist.world_size
                dist.all_gather_object(gathered, new_bad)
            names = [b for part in gathered for b in part]
            self.bad_names += names
            if self.dist.is_main:
                with open(self.out / "bad_samples.txt", "a") as f:
                    f.writelines(f"{b}\n" for b in names)
                for b in names:
                    tqdm.write(f"skipped bad sample {b}")
        if self.state.samples_seen >= d.min_seen_for_bad_check:
            check_bad_share(self.state.bad_seen, self.state.samples_seen, d.max_bad_fraction, self.bad_names, "images")

    # -- the run ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t, s = self.recipe.train, self.state
        spe, accum = self.sampler.steps_per_epoch, t.grad_accum
        total = t.epochs * spe if t.max_steps is None else min(t.max_steps, t.epochs * spe)
        bar = tqdm(
            total=total,
            initial=s.global_step,
            disable=not self.dist.is_main,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
        )
        last: dict[str, float] = {}
        tic, samples_since = time.perf_counter(), 0
        self.trainer.train()
        while s.epoch < t.epochs and s.global_step < total:
            self.sampler.set_epoch(s.epoch, s.step_in_epoch)
            if self.dataset is not None:
                self.dataset.set_epoch(s.epoch)
            it = iter(self.loader)
            while s.step_in_epoch < spe and s.global_step < total:
                micro = [next(it) for _ in range(accum)]
                self._account_bad(micro)
                last = self._step(micro, s.epoch, s.step_in_epoch)
                s.step_in_epoch += 1
                s.global_step += 1
                samples_since += self.sampler.global_batch
                bar.update(1)
                rate = bar.format_dict.get("rate") or 0.0  # optimizer steps/s, smoothed by tqdm
                bar.set_postfix(
                    {k.removeprefix("loss_"): f"{last[k]:.3f}" for k in self.task.loss_keys[1:]},
                    lr=f"{last['lr']:.2e}",
                    alpha=f"{last['alpha']:.2f}",
                    samples_s=f"{rate * self.sampler.global_batch:.1f}",
                )
                if s.global_step % t.log_every == 0 or s.step_in_epoch == spe or s.global_step == total:
                    now = time.perf_counter()
                    last["samples_per_s"] = samples_since / max(now - tic, 1e-9)
                    tic, samples_since = now, 0
                    self.metrics.log(s.global_step, {**last, "epoch": s.epoch, "bad_samples": s.bad_seen})
                if t.checkpoint_every and s.global_step % t.checkpoint_every == 0:
                    self.save()
            if s.step_in_epoch >= spe:
                s.epoch, s.step_in_epoch = s.epoch + 1, 0
                self.save(best=self.validate())
        bar.close()
        self.save()
        self.metrics.close()
        if self.dist.is_main and (self.out / "metrics.jsonl").exists():
            try:
                plot_losses(self.out / "metrics.jsonl", self.out / "loss_curves.png")
            except ValueError as e:  # no logged step yet
                log.warning("no loss plot: %s", e)
        summary = {
            "global_step": s.global_step,
            "epoch": s.epoch,
            "bad_samples": s.bad_seen,
            "samples_seen": s.samples_seen,
            **last,
        }
        if self.validator is not None:
            summary.update(best_epoch=s.best_epoch, **{f"best_{self.validator.metric}": s.best_metric})
        return summary
