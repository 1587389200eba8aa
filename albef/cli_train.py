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
import sys

from albef.recipes import load_recipe


FINETUNE_TASKS = ("retrieval", "grounding", "vqa", "ve", "nlvr", "nlvr_pretrain")


def finetune(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] not in FINETUNE_TASKS:
        print(f"usage: albef finetune {{{','.join(FINETUNE_TASKS)}}} --config RECIPE [key.sub=value ...]")
        return 2
    return main(argv[1:], task=argv[0])


def main(argv: list[str] | None = None, task: str = "pretrain") -> int:
    p = argparse.ArgumentParser(prog="albef pretrain" if task == "pretrain" else f"albef finetune {task}",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from OUTPUT_DIR/checkpoint_last.pt, or from the given checkpoint")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.lr=1e-4 data.num_workers=2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.config, args.overrides)
    # a recipe names its task; one that names none (task defaults to pretrain) may be fine-tuned
    if recipe.task != task and not (task != "pretrain" and recipe.task == "pretrain"):
        cmd = "albef pretrain" if recipe.task == "pretrain" else f"albef finetune {recipe.task}"
        p.error(f"the recipe is for task {recipe.task!r}: run it with `{cmd}`")
    recipe.task = task
    if not recipe.data.train_files and not recipe.data.shards:
        p.error("no training data: set data.train_files (JSON) or data.shards (WebDataset) in the recipe "
                "or as an override")
    try:
        recipe.model.check_sources()
    except FileNotFoundError as e:
        p.error(str(e))
    from albef.training.loop import PretrainRun  # heavy imports after argument checks
    from albef.training.distributed import shutdown

    try:
        run = PretrainRun(recipe, resume=args.resume)
        summary = run.fit()
    finally:
        shutdown()
    if run.dist.is_main:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
