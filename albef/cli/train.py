"""``albef pretrain`` / ``albef finetune TASK``: training from a YAML recipe.

    albef pretrain --config RECIPE.yaml [key.sub=value ...] [--resume [CHECKPOINT]]
    albef finetune retrieval --config recipes/retrieval_coco.yaml model.init=ALBEF.pth

Runs as one process, or under torchrun as many (one per GPU, or CPU processes with gloo):

    torchrun --nproc_per_node 8 -m albef.cli pretrain --config recipes/pretrain_14m.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from albef.recipes import load_recipe

# the authors' settings of each task (their scripts default --config to these configs)
AUTHORS_RECIPES = {
    "retrieval": "recipes/retrieval_coco.yaml or recipes/retrieval_flickr.yaml",
    "grounding": "recipes/grounding_refcoco.yaml",
    "vqa": "recipes/vqa.yaml",
    "ve": "recipes/ve.yaml",
    "nlvr": "recipes/nlvr.yaml",
    "nlvr_pretrain": "recipes/nlvr_pretrain.yaml",
}
FINETUNE_TASKS = tuple(AUTHORS_RECIPES)


def finetune(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] not in FINETUNE_TASKS:
        print(f"usage: albef finetune {{{','.join(FINETUNE_TASKS)}}} --config RECIPE [key.sub=value ...]")
        return 2
    return main(argv[1:], task=argv[0])


def _resume_keeps_overrides(argv: list[str]) -> list[str]:
    """``--resume key=value``: argparse would take the override as the checkpoint's path. A
    ``key.sub=value`` after ``--resume`` is an override, so ``--resume`` stands alone there."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume" and i + 1 < len(argv) and re.match(r"^[A-Za-z_][\w.]*=", argv[i + 1]):
            out[-1] = "--resume="  # empty value: resume the run in output_dir
    return out


def main(argv: list[str] | None = None, task: str = "pretrain") -> int:
    p = argparse.ArgumentParser(
        prog="albef pretrain" if task == "pretrain" else f"albef finetune {task}", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", help="YAML recipe (see recipes/); required by albef finetune")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run in output_dir (its checkpoint_last.pt, else checkpoint_prev.pt), or "
        "from the given checkpoint file",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a run, deleting its checkpoints and logs",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.lr=1e-4 data.num_workers=2")
    args = p.parse_intermixed_args(_resume_keeps_overrides(list(argv or [])))  # overrides before and after options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config is None and task != "pretrain":
        # the recipe defaults are pretraining's (lr 1e-4, 30 epochs, 256 px): never a task's settings
        p.error(
            f"--config RECIPE is required: the authors' {task} settings are in {AUTHORS_RECIPES[task]} "
            f"(a recipe of just `task: {task}` takes pretraining's learning rate, epochs and resolution)"
        )
    try:
        recipe = load_recipe(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as e:  # before any data is read or folder made
        p.error(str(e))
    # a recipe names its task; one that names none (task defaults to pretrain) may be fine-tuned
    if recipe.task != task and not (task != "pretrain" and recipe.task == "pretrain"):
        cmd = "albef pretrain" if recipe.task == "pretrain" else f"albef finetune {recipe.task}"
        p.error(f"the recipe is for task {recipe.task!r}: run it with `{cmd}`")
    recipe.task = task
    if not recipe.data.train_files and not recipe.data.shards:
        p.error(
            "no training data: set data.train_files (JSON) or data.shards (WebDataset) in the recipe or as an override"
        )
    if args.resume == "":  # "--resume=" stands for a bare --resume (see _resume_keeps_overrides)
        args.resume = True
    from albef.training.checkpoint import check_output_dir

    try:
        check_output_dir(Path(recipe.output_dir), args.resume, args.overwrite)
        recipe.model.check_sources()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        p.error(str(e))
    from albef.distributed import shutdown
    from albef.training.loop import TrainRun  # heavy imports after argument checks

    try:
        try:  # what construction refuses (data, init or checkpoint files, validation set) is a usage error
            run = TrainRun(recipe, resume=args.resume, overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            p.error(str(e))
        summary = run.fit()
    finally:
        shutdown()
    if run.dist.is_main:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
