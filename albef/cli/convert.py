"""``albef convert SRC DST``: an authors' checkpoint (.pth) -> an albef model folder.

The model's sizes are read from the tensors (depths, widths, fusion layer, image resolution);
attention heads follow the 64-wide heads of ViT-B and BERT-base. ``--image-size`` resizes the
position table (e.g. 384 for fine-tuning from a 256-pixel pretraining checkpoint). Loading is
strict; the report says what was dropped (momentum copies, queues) and why.

A training run's checkpoint (``checkpoint_last.pt``, ``checkpoint_best.pt``, or the run folder:
best, else last) and an albef model folder store their model config: it is used as it is (the
student of a checkpoint is written), and a ``--preset``, ``--vision-heads``, ``--text-heads`` or
``--task`` that contradicts it is an error naming the differing fields.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from albef.checkpoints.convert import from_authors
from albef.checkpoints.loading import LoadReport, load_albef, read_state_dict
from albef.checkpoints.pretrained import (
    CONFIG,
    WEIGHTS,
    from_pretrained,
    is_training_checkpoint,
    peek_checkpoint,
    resolve_model_path,
    save_pretrained,
)
from albef.checkpoints.pretrained import _build as build_model
from albef.checkpoints.pretrained import _describe as describe_model
from albef.config import ALBEFConfig, get_preset
from albef.data.annotations import read_json_file
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA


def config_from_state_dict(
    sd: dict[str, Tensor],
    preset: str = "albef-base",
    image_size: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    task: str = "albef",
) -> ALBEFConfig:
    """Infer the model config of an authors' (or our) state dict from its tensor shapes."""
    sd = from_authors(sd) if not any(k.startswith("model.") for k in sd) else sd
    base = get_preset(preset).to_dict()
    v, t = base["vision"], base["text"]
    try:
        pos = sd["model.visual_encoder.pos_embed"]
        patch = sd["model.visual_encoder.patch_embed.proj.weight"]
        words = sd["model.text_encoder.embeddings.word_embeddings.weight"]
    except KeyError as e:
        raise ValueError(f"not an ALBEF state dict: {e.args[0]} is missing") from None
    v["width"], v["patch_size"] = patch.shape[0], patch.shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5)
    v["image_size"] = image_size or grid * v["patch_size"]
    v["depth"] = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.visual_encoder\.blocks\.(\d+)\.", k)))
    v["num_heads"] = vision_heads or max(1, v["width"] // 64)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"model\.text_encoder\.encoder\.layer\.(\d+)\.", k))}
    cross = {
        int(m.group(1)) for k in sd if (m := re.match(r"model\.text_encoder\.encoder\.layer\.(\d+)\.crossattention", k))
    }
    n_layers, fusion = max(layers) + 1, min(cross) if cross else max(layers) + 1
    if task == "nlvr":  # the NLVR2 encoder duplicates each fusion layer: store the base depth
        n_layers = fusion + (n_layers - fusion) // 2
    t.update(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_layers=n_layers,
        fusion_layer=fusion,
        num_heads=text_heads or max(1, words.shape[1] // 64),
        intermediate_size=sd["model.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["model.text_encoder.embeddings.position_embeddings.weight"].shape[0],
        encoder_width=v["width"],
        type_vocab_size=sd["model.text_encoder.embeddings.token_type_embeddings.weight"].shape[0]
        if "model.text_encoder.embeddings.token_type_embeddings.weight" in sd
        else 0,
    )
    if "model.vision_proj.weight" in sd:
        base["embed_dim"] = sd["model.vision_proj.weight"].shape[0]
    if "queue.image_queue" in sd:
        base["queue_size"] = sd["queue.image_queue"].shape[1]
    return ALBEFConfig.from_dict(base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef convert", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "src",
        help="the authors' checkpoint (.pth), wrapped {'model': ...} or bare; or a training "
        "run's checkpoint (.pt) or run folder, whose stored model config is used",
    )
    p.add_argument("dst", help="output folder (config.json, model.safetensors, tokenizer files)")
    p.add_argument(
        "--preset",
        help="preset for what tensors cannot tell (dropout, text settings; default "
        "albef-base); a training checkpoint's stored config wins, and a preset that "
        "contradicts it is an error",
    )
    p.add_argument("--image-size", type=int, help="resize the position table to this resolution")
    p.add_argument("--vision-heads", type=int, help="ViT attention heads (default: width / 64)")
    p.add_argument("--text-heads", type=int, help="BERT attention heads (default: hidden / 64)")
    p.add_argument(
        "--task",
        choices=["auto", "albef", "vqa", "ve", "nlvr"],
        default="auto",
        help="which model the checkpoint holds (auto: from its keys)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the model in an existing DST folder")
    args = p.parse_args(argv)
    if (Path(args.dst) / CONFIG).exists() and not args.overwrite:
        p.error(f"{args.dst} already holds a model: give another folder, or --overwrite to replace it")
    src = resolve_model_path(args.src)
    stored = _stored(src)
    if stored is not None:
        return _convert_stored(p, args, src, *stored)
    sd = read_state_dict(src)
    task = detect_task(sd) if args.task == "auto" else args.task
    cfg = config_from_state_dict(
        sd, args.preset or "albef-base", args.image_size, args.vision_heads, args.text_heads, task
    )
    model = build_for_task(task, cfg, sd)
    report = load_albef(model, sd, str(src))
    save_pretrained(model, args.dst)
    print(report)
    print(
        f"wrote {args.dst}: {type(model).__name__} (task {task}, image size {cfg.vision.image_size}, "
        f"{cfg.text.num_layers} text layers, fusion from {cfg.text.fusion_layer})"
    )
    return 0


# the training wrapper's hyper-parameters: the inference model ignores them, so a preset may differ there
TRAINING_ONLY = ("queue_size", "momentum", "mlm_probability")
# a training recipe's task -> the model convert writes
RECIPE_TASKS = {
    "pretrain": "albef",
    "retrieval": "albef",
    "grounding": "albef",
    "vqa": "vqa",
    "ve": "ve",
    "nlvr": "nlvr",
}


def _stored(src: Path) -> tuple[ALBEFConfig, str, str, str | None] | None:
    """(config, task, where it comes from, the run's preset) of a source that stores its model config: a training
    checkpoint or an albef model folder; None for a state dict (the config is then inferred)."""
    if src.is_dir() and (src / CONFIG).exists():
        meta = read_json_file(src / CONFIG)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{src / CONFIG}: no 'config' object; the folder is damaged: write it again")
        task = {"classification": "nlvr" if meta.get("num_images") == 2 else "ve"}.get(
            meta.get("task"), meta.get("task", "albef")
        )
        return ALBEFConfig.from_dict(meta["config"]), task, f"its {CONFIG}", None
    if not src.is_file() or src.suffix == ".safetensors":
        return None
    obj = peek_checkpoint(src)
    if not is_training_checkpoint(obj):
        return None
    recipe = obj["recipe"]
    m = recipe.get("model", {})
    where = f"the run's model.preset={m.get('preset')}"
    where += f", model.overrides={json.dumps(m['overrides'])}" if m.get("overrides") else ""
    task = RECIPE_TASKS.get(recipe.get("task"), recipe.get("task"))
    return ALBEFConfig.from_dict(obj["model_config"]), task, where, m.get("preset")


def config_conflicts(
    cfg: ALBEFConfig,
    task: str,
    preset: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    want_task: str = "auto",
    stored_preset: str | None = None,
) -> list[str]:
    """The options that contradict a stored config, one ``field (option value, stored value)`` each.
    Training-only hyper-parameters (queue size, momentum, alpha, MLM probability) are not compared, nor
    the image size (``--image-size`` asks for a resize of the position table). The preset the run
    itself named (``stored_preset``, its overrides applied) agrees by definition."""
    out = []
    if preset is not None and preset != stored_preset:
        ref = get_preset(preset).to_dict()
        have = cfg.to_dict()
        for key in ref:
            if key in TRAINING_ONLY:
                continue
            for name, a, b in (
                ((f"{key}.{k}", ref[key][k], have[key][k]) for k in ref[key])
                if isinstance(ref[key], dict)
                else [(key, ref[key], have[key])]
            ):
                if a != b:
                    out.append(f"{name} (--preset {preset}: {a!r}, stored: {b!r})")
    for name, flag, value, stored in (
        ("vision.num_heads", "--vision-heads", vision_heads, cfg.vision.num_heads),
        ("text.num_heads", "--text-heads", text_heads, cfg.text.num_heads),
    ):
        if value is not None and value != stored:
            out.append(f"{name} ({flag} {value}, stored: {stored})")
    if want_task != "auto" and want_task != task:
        out.append(f"task (--task {want_task}, stored: {task})")
    return out


def _convert_stored(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    src: Path,
    cfg: ALBEFConfig,
    task: str,
    where: str,
    stored_preset: str | None,
) -> int:
    bad = config_conflicts(cfg, task, args.preset, args.vision_heads, args.text_heads, args.task, stored_preset)
    if bad:
        p.error(
            f"{src} stores its model config ({where}); the options contradict it in:\n  "
            + "\n  ".join(bad)
            + "\nthe stored config is what the weights were trained with: drop those options"
        )
    if src.is_dir():
        model = from_pretrained(src)
        report = LoadReport(str(src / WEIGHTS), loaded=sorted(model.state_dict()))
    else:
        from albef.training.loop import load_trainer_from_checkpoint

        trainer = load_trainer_from_checkpoint(src, "cpu")
        model, keys = trainer.model.eval(), list(trainer.state_dict())
        report = LoadReport(
            str(src),
            loaded=[k for k in keys if k.startswith("model.")],
            dropped={k: "momentum teacher and queues: training state" for k in keys if not k.startswith("model.")},
        )
    if args.image_size and args.image_size != cfg.vision.image_size:  # the one change asked for: a resize
        cfg = ALBEFConfig.from_dict(
            {**cfg.to_dict(), "vision": {**cfg.to_dict()["vision"], "image_size": args.image_size}}
        )
        resized = build_model({**describe_model(model), "config": cfg.to_dict()})
        report = load_albef(resized, {"model." + k: v for k, v in model.state_dict().items()}, str(src))
        model = resized
    save_pretrained(model, args.dst)
    print(report)
    print(
        f"wrote {args.dst}: {type(model).__name__} (task {task}, model config stored in {src}: {where}; image size "
        f"{cfg.vision.image_size}, {cfg.text.num_layers} text layers, fusion from {cfg.text.fusion_layer})"
    )
    return 0


def detect_task(sd: dict[str, Tensor]) -> str:
    keys = set(from_authors(sd) if not any(k.startswith("model.") for k in sd) else sd)
    if any(k.startswith("model.text_decoder.") for k in keys):
        return "vqa"
    if "model.cls_head.2.weight" in keys:
        return "nlvr" if _cls_classes(sd) == 2 else "ve"
    return "albef"


def _cls_classes(sd: dict[str, Tensor]) -> int:
    w = sd.get("cls_head.2.weight", sd.get("model.cls_head.2.weight"))
    return int(w.shape[0])


def build_for_task(task: str, cfg: ALBEFConfig, sd: dict[str, Tensor]) -> torch.nn.Module:
    if task == "vqa":
        n_dec = 1 + max(
            int(m.group(1)) for k in sd if (m := re.search(r"text_decoder\.(?:bert\.)?encoder\.layer\.(\d+)\.", k))
        )
        return ALBEFForVQA(cfg, n_dec)
    if task in ("ve", "nlvr"):
        return ALBEFForClassification(cfg, _cls_classes(sd), 2 if task == "nlvr" else 1)
    has_mlm = any(k.startswith(("text_encoder.cls.", "model.mlm_head.")) for k in sd)
    return ALBEF(cfg, mlm_head=has_mlm)


if __name__ == "__main__":
    sys.exit(main())
