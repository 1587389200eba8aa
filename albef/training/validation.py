"""Validation at the end of every fine-tuning epoch, and the choice of the best epoch.

The authors evaluate the validation split after each epoch and keep the checkpoint with the best
score: retrieval by the two-stage (ITC + ITM) ``r_mean``, SNLI-VE and NLVR2 by accuracy,
grounding by Grad-CAM box accuracy. :class:`Validator` reads the validation files once, before
training starts (a bad file fails the run at once, not after the first epoch), and scores the
student with the same functions as ``albef evaluate``, so under torchrun each rank takes a share.

Example:
    >>> v = Validator.from_recipe(recipe, cfg, tokenizer)          # doctest: +SKIP
    >>> v(trainer.model, device)                                   # doctest: +SKIP
    {'r_mean': 41.2, 'txt_r1': ..., 'itc_r_mean': 38.0}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from albef.config import ALBEFConfig
from albef.data.transforms import test_transform
from albef.text import Tokenizer

#: the metric each task selects its best epoch on (the authors' choice), higher is better
SELECT_METRIC = {"retrieval": "r_mean", "grounding": "accuracy", "ve": "accuracy", "nlvr": "accuracy"}


def check_images(paths: Iterable[str]) -> None:
    """Every validation image is a file that decodes, checked before training (a missing or damaged
    one would otherwise stop the run at the first epoch's end): an error naming the first few.

    JPEGs are decoded at an eighth of their size (PIL's ``draft``), which still reads every byte of
    the file, so a file cut short is found at a fraction of the full decode's time."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    paths = sorted(set(paths))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data.val_files: {len(missing)} validation image(s) not found, e.g. {', '.join(missing[:3])}; "
            "set data.val_image_root (or data.image_root) to the folder the files' paths are relative to"
        )
    bad = []
    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # as evaluation reads them
    try:
        for p in paths:
            try:
                with Image.open(p) as img:
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
            except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                bad.append(f"{p} ({type(e).__name__}: {e})")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    if bad:
        raise ValueError(
            f"data.val_files: {len(bad)} validation image(s) cannot be read, e.g. {'; '.join(bad[:3])}; "
            "replace those files or drop their entries (validation skips no sample: the best epoch would be "
            "chosen on another set)"
        )


@dataclass
class Validator:
    """Scores a model on the validation split; ``metric`` names the entry that selects the best epoch."""

    task: str
    metric: str
    evaluate: Callable[[nn.Module, torch.device], dict[str, float]]
    size: int

    @classmethod
    def from_recipe(cls, recipe: Any, cfg: ALBEFConfig, tokenizer: Tokenizer) -> Validator | None:
        """None when the recipe names no ``data.val_files``; an error for a task that has no
        validation metric (pretraining, text assignment, VQA, whose answers the authors score on
        the evaluation server)."""
        d, t = recipe.data, recipe.train
        if not d.val_files:
            return None
        if recipe.task not in SELECT_METRIC:
            raise ValueError(
                f"data.val_files: task {recipe.task!r} has no validation metric (tasks that have one: "
                f"{', '.join(sorted(SELECT_METRIC))}); remove data.val_files"
            )
        if t.fsdp:
            raise ValueError(
                "data.val_files is not supported with train.fsdp (each rank would run its own share of "
                "the sharded model's forwards); evaluate the epochs' checkpoints with `albef evaluate`"
            )
        cleaning = d.text_cleaning or cfg.text_cleaning
        root = d.val_image_root or d.image_root
        transform = test_transform(cfg.vision.image_size)
        metric = t.select_metric or SELECT_METRIC[recipe.task]
        if recipe.task == "retrieval":
            from albef.data.retrieval import read_retrieval_eval
            from albef.evaluation.retrieval import evaluate_retrieval

            data = read_retrieval_eval(d.val_files, root, d.max_words, cleaning)
            check_images(data.images)

            def run(model: nn.Module, device: torch.device) -> dict[str, float]:
                res = evaluate_retrieval(
                    model,
                    data,
                    tokenizer,
                    transform,
                    t.k_test,
                    batch_size=t.val_batch_size,
                    num_workers=d.num_workers,
                    device=device,
                )
                return {**res["itm"], **{f"itc_{k}": v for k, v in res["itc"].items()}}

            return cls(recipe.task, metric, run, len(data.texts))
        if recipe.task == "grounding":
            from albef.evaluation.grounding import evaluate_grounding, read_grounding

            records = read_grounding(d.val_files, root, cleaning, d.max_words)
            check_images(r.image for r in records)

            def run(model: nn.Module, device: torch.device) -> dict[str, float]:
                metrics, _ = evaluate_grounding(
                    model, records, tokenizer, transform, "itm", None, t.val_batch_size, device
                )
                return {
                    "accuracy": metrics["accuracy"],
                    **{f"accuracy_{k}": v for k, v in metrics["per_split"].items()},
                }

            return cls(recipe.task, metric, run, len(records))
        from albef.data.classification import read_classification
        from albef.evaluation.tasks import evaluate_classification

        records, bad = read_classification(d.val_files, root, recipe.task, cleaning, d.max_words)
        if bad:  # skipping would silently change what the best epoch is chosen on
            raise ValueError("bad validation entries:\n  " + "\n  ".join(map(str, bad[:20])))
        check_images(p for r in records for p in r.image_paths)

        def run(model: nn.Module, device: torch.device) -> dict[str, float]:
            return {
                "accuracy": evaluate_classification(
                    model, records, tokenizer, transform, t.val_batch_size, d.num_workers, device
                )["accuracy"]
            }

        return cls(recipe.task, metric, run, len(records))

    def __post_init__(self) -> None:
        if self.size == 0:
            raise ValueError(f"data.val_files: the {self.task} validation set is empty; name files with entries")

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        was_training = model.training
        try:
            # plain floats: numpy scalars would not pickle safely
            metrics = {k: float(v) for k, v in self.evaluate(model, device).items()}
        finally:
            model.train(was_training)
        if self.metric not in metrics:
            raise ValueError(
                f"train.select_metric {self.metric!r} is not a {self.task} validation metric; "
                f"choose one of {sorted(metrics)}"
            )
        return metrics
