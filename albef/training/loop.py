"""The training loop of every task: one process or many (torchrun), CPU or GPU, resumable to
the sample. The run's parts are built by :mod:`albef.training.build`; the task (its trainer,
dataset and micro-step) comes from :mod:`albef.training.tasks`.

Determinism is by construction: the data order comes from :class:`GlobalBatchSampler`, every
sample's augmentation from its own seed, and every micro-batch's random draws (hard negatives,
masking, dropout) from a seed derived from ``(seed, epoch, step, micro-batch)``. Hence a resumed
run continues exactly where it stopped, and one process with gradient accumulation ``k``
computes what ``k`` processes compute together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from albef.config import ALBEFConfig, differences
from albef.data.annotations import BadSample, check_bad_share
from albef.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from albef.heap import release_after_step, tune_for_training
from albef.models.albef import checkpointed_parts
from albef.precision import autocast_dtype, resolve_precision, set_tf32, training_autocast
from albef.recipes import Recipe, alpha_ramp_for, crop_scale_for
from albef.seeding import micro_seed
from albef.text import Tokenizer, default_max_words
from albef.training.build import build_data, build_trainer, wrap_trainer
from albef.training.checkpoint import (
    check_geometry,
    check_output_dir,
    delete_run_files,
    full_train_state,
    load_train_state,
    rng_state,
    run_geometry,
    set_rng_state,
)
from albef.training.fsdp import clip_grad_norm, sync_replicated_grads
from albef.training.metrics import MetricsLogger, plot_losses
from albef.training.momentum import momentum_update
from albef.training.optim import build_optimizer, resolve_in_backward
from albef.training.schedule import LRSchedule, alpha_at
from albef.training.tasks import get_task
from albef.training.validation import Validator

log = logging.getLogger("albef.train")


@dataclass
class RunState:
    epoch: int = 0
    step_in_epoch: int = 0  # the next step to run
    global_step: int = 0
    samples_seen: int = 0
    bad_seen: int = 0
    best_metric: float | None = None  # the validation metric of the best epoch so far
    best_epoch: int | None = None  # its number, counted from 1
    validation_pending: bool = False  # the last epoch's validation failed: run again on resume


def load_trainer_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the student, teacher and queues of a run from its checkpoint.

    Example:
        >>> trainer = load_trainer_from_checkpoint("runs/pretrain/checkpoint_last.pt")  # doctest: +SKIP
        >>> model = trainer.model.eval()                                                 # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    recipe = Recipe.from_dict(ckpt["recipe"])
    trainer = get_task(recipe.task).build_trainer(ALBEFConfig.from_dict(ckpt["model_config"]), recipe)
    trainer.load_state_dict(ckpt["model"], strict=True)
    return trainer.to(device)


class TrainRun:
    """One training run of any task (:class:`~albef.recipes.Recipe`); :meth:`fit` runs it.

    ``resume``: True continues the run in ``output_dir`` (from its ``checkpoint_last.pt``, or
    ``checkpoint_prev.pt`` when the last is unreadable), a path continues from that checkpoint.
    ``overwrite``: start over in a folder that holds a run, deleting its checkpoints and logs;
    without it (or ``resume``) such a folder is an error, before any work.
    """

    def __init__(self, recipe: Recipe, resume: bool | str = False, overwrite: bool = False):
        self.recipe = r = recipe
        t = r.train
        self.out = Path(r.output_dir)
        check_output_dir(self.out, resume, overwrite)  # before any work or folder
        r.model.check_sources()
        self.dist: DistInfo = init_distributed(t.device)
        # before the first step's allocations (albef.heap)
        on_cpu, self.checkpointing = self.dist.device.type == "cpu", any(checkpointed_parts(t.grad_checkpointing))
        tune_for_training(t.keep_freed_memory, on_cpu, self.checkpointing)
        self.alpha_ramp = alpha_ramp_for(r)  # the task's when unset
        self.cfg = r.model.build_config()  # a bad model setting fails before a folder is touched
        self._prepare_folder()
        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts them)
        self.tokenizer = Tokenizer(add_sep=self.cfg.add_sep)
        self.task = get_task(r.task)
        # read before any training, so that a bad validation file fails now and not after an epoch
        self.validator = Validator.from_recipe(r, self.cfg, self.tokenizer)
        self.data = build_data(r, self.task, self.cfg, self.tokenizer, self.dist)
        self.sampler = self.data.sampler
        self.trainer, self.init_report = build_trainer(r, self.task, self.cfg, self.sampler.global_batch, self.dist)
        self._set_precision()  # before any wrapping or sharding work
        self.wrapped, self.replicated = wrap_trainer(self.trainer, r, self.precision, self.dist)
        self.optimizer = build_optimizer(
            self.trainer.model, t.lr, t.weight_decay, in_backward=self.in_backward, lr_scale=t.lr_scale
        )
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
        if overwrite:  # only now that every rank has read the recipe, data and weights
            barrier()
            if self.dist.is_main:
                delete_run_files(self.out)
            barrier()
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

    def _prepare_folder(self) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in clean_stale_temp_files(self.out):  # left by writes that a kill interrupted
                log.warning("removed %s, a partial write of a killed run", tmp)

    def _set_precision(self) -> None:
        """fp32 | bf16 | fp16 for this device (auto: bf16 only on native-bf16 hardware), logged by the
        main rank; autocast on CUDA and on the CPU (bf16), weights, gradients and AdamW state float32."""
        t, dev = self.recipe.train, self.dist.device
        self.precision = resolve_precision(t.precision, dev, "train.precision", report=self.dist.is_main)
        self.in_backward = resolve_in_backward(
            t.optimizer_in_backward, t.grad_accum, t.max_grad_norm, self.precision, self.dist.world_size, t.fsdp
        )
        if dev.type == "cuda":
            set_tf32(t.tf32)
        self.amp_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and self.precision == "fp16")

    # -- checkpoints ------------------------------------------------------------------------
    def _warn_changed_resolution(self, path: Path, saved: dict) -> None:
        """A run written when an unset crop scale, α ramp or word limit meant another value carries
        that value in its recipe: say so where this run resolves the key differently."""
        cleaning = self.recipe.data.text_cleaning or self.cfg.text_cleaning
        max_words = self.recipe.data.max_words or default_max_words(cleaning)

        def plain(v):  # a saved recipe may hold a list where this one has a tuple
            return list(v) if isinstance(v, (list, tuple)) else v

        for key, then, now in (
            ("data.crop_scale", saved.get("data", {}).get("crop_scale"), crop_scale_for(self.recipe)),
            ("train.alpha_ramp_epochs", saved.get("train", {}).get("alpha_ramp_epochs"), alpha_ramp_for(self.recipe)),
            ("data.max_words", saved.get("data", {}).get("max_words"), max_words),
        ):
            if then is not None and plain(then) != plain(now):
                if self.dist.is_main:
                    log.warning(
                        "%s was written with %s = %s; this run uses %s: set %s=%s in the recipe to resume as it ran",
                        path,
                        key,
                        then,
                        now,
                        key,
                        then,
                    )

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
        if "model_config" not in ckpt or "optimizer" not in ckpt:
            raise ValueError(
                f"{path} is not a training checkpoint of albef (no model config or optimizer state): "
                "--resume continues a run; to start a run from these weights, give model.init"
            )
        # earlier versions: legacy keys too; head_init only shapes a model being built, not one resumed
        saved = dataclasses.replace(ALBEFConfig.from_dict(ckpt["model_config"]), head_init=self.cfg.head_init)
        if saved != self.cfg:
            changed = ", ".join(
                f"{k}: {a!r} in the checkpoint, {b!r} here"
                for k, a, b in differences(saved.to_dict(), self.cfg.to_dict())
            )
            raise ValueError(f"{path} was written for another model config ({changed}); resume it with its own recipe")
        self._warn_changed_resolution(path, ckpt.get("recipe", {}))
        saved_scale = ckpt.get("recipe", {}).get("train", {}).get("lr_scale") or {}
        if saved_scale != (self.recipe.train.lr_scale or {}):  # the optimizer's groups would not match
            raise ValueError(
                f"{path} was written with train.lr_scale {saved_scale}, this run has "
                f"{self.recipe.train.lr_scale or {}}: keep it as it was to resume"
            )
        load_train_state(self.trainer, self.optimizer, ckpt)
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler
            self.scaler.load_state_dict(ckpt["scaler"])
        for warning in check_geometry(ckpt.get("geometry"), self._geometry(), path):
            if self.dist.is_main:
                log.warning("%s", warning)
        self.state = RunState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d step %d", path, self.state.epoch, self.state.step_in_epoch)
        return loaded_path

    def _geometry(self) -> dict[str, Any]:
        return run_geometry(self.recipe, self.sampler.global_batch, self.sampler.steps_per_epoch, self.dist.world_size)

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

    def _end_epoch_validation(self) -> None:
        """Validate the epoch just finished and save (as ``checkpoint_best.pt`` too when it is the
        best). If validation fails (an unreadable image, Ctrl-C), the epoch's training is saved
        first, marked so that a resumed run validates it before going on."""
        s = self.state
        try:
            s.validation_pending = self.validator is not None
            improved = self.validate()
        except BaseException:
            if not self.recipe.train.fsdp and self.dist.world_size == 1:  # no collective to hang in
                self.save()
                log.error(
                    "validation after epoch %d did not finish; the epoch is saved, --resume validates it", s.epoch
                )
            raise
        s.validation_pending = False
        self.save(best=improved)

    def validate(self) -> bool:
        """Score the student on the validation split (every rank a share), log the metrics and say
        whether this epoch is the best so far. False without ``data.val_files``."""
        if self.validator is None:
            return False
        s = self.state
        metrics = self.validator(self.trainer.model, self.dist.device)
        score = metrics[self.validator.metric]
        improved = s.best_metric is None or score > s.best_metric  # the authors' strict ">"
        best_epoch = s.epoch if improved else s.best_epoch
        self.metrics.log(s.global_step, {**metrics, "epoch": s.epoch, "best_epoch": best_epoch}, split="val")
        if improved:  # only once validation has finished
            s.best_metric, s.best_epoch = score, s.epoch
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
        alpha = alpha_at(t.alpha, epoch, step, self.sampler.steps_per_epoch, self.alpha_ramp)
        keys = self.task.loss_keys
        payloads, sums = [], torch.zeros(len(keys), dtype=torch.float64)
        for j, batch in enumerate(micro_batches):
            batch = batch.to(dev, non_blocking=True)
            seed = micro_seed(t.seed, epoch, step, self.dist.rank * t.grad_accum + j)
            torch.manual_seed(seed)  # dropout
            gen = torch.Generator(device=dev).manual_seed(seed)
            last = j == len(micro_batches) - 1
            sync = self.wrapped.no_sync() if (self.wrapped is not self.trainer and not last) else nullcontext()
            with sync:
                first = j == 0
                if first and t.fsdp and self.trainer.model_m is not None:
                    # the EMA on matching shards, before any FSDP unit gathers
                    momentum_update(self.trainer.model, self.trainer.model_m, self.trainer.momentum)
                    first = False
                with training_autocast(dev, self.amp_dtype, self.checkpointing):
                    loss, logs, payload = self.task.micro_step(self.wrapped, batch, alpha, gen, first=first)
                self.scaler.scale(loss / len(micro_batches)).backward()  # outside autocast, as PyTorch advises
            payloads.append(payload)
            sums += torch.tensor(
                [float(logs[k].detach()) if logs[k] is not None else 0.0 for k in keys], dtype=torch.float64
            )
        if t.fsdp:  # FSDP reduced the sharded blocks' gradients; the replicated rest is averaged here
            sync_replicated_grads(self.replicated)
        grad_norm = math.nan  # before clipping; logged only when clipping computes it
        if t.max_grad_norm and t.fsdp:  # no fp16 under FSDP, so nothing to unscale
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
            desc=self.task.name,
            unit="step",
            dynamic_ncols=True,
        )
        last: dict[str, float] = {}
        tic, samples_since = time.perf_counter(), 0
        if s.validation_pending:  # resumed after a validation that failed: that epoch is scored first
            self._end_epoch_validation()
        self.trainer.train()
        while s.epoch < t.epochs and s.global_step < total:
            self.sampler.set_epoch(s.epoch, s.step_in_epoch)
            if self.data.dataset is not None:
                self.data.dataset.set_epoch(s.epoch)
            it = iter(self.data.loader)
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
                self._end_epoch_validation()
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
