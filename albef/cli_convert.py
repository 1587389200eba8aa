"""``albef convert SRC DST``: an authors' checkpoint (.pth) -> an albef model folder.

The model's sizes are read from the tensors (depths, widths, fusion layer, image resolution);
attention heads follow the 64-wide heads of ViT-B and BERT-base. ``--image-size`` resizes the
position table (e.g. 384 for fine-tuning from a 256-pixel pretraining checkpoint). Loading is
strict; the report says what was dropped (momentum copies, queues) and why.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
from torch import Tensor

from albef.config import ALBEFConfig, get_preset
from albef.convert import from_authors
from albef.hub import save_pretrained
from albef.loading import load_albef, read_state_dict
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA


def config_from_state_dict(sd: dict[str, Tensor], preset: str = "albef-base", image_size: int | None = None,
                           vision_heads: int | None = None, text_heads: int | None = None,
                           task: str = "albef") -> ALBEFConfig:
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
    cross = {int(m.group(1)) for k in sd if (m := re.match(r"model\.text_encoder\.encoder\.layer\.(\d+)\.crossattention", k))}
    n_layers, fusion = max(layers) + 1, min(cross) if cross else max(layers) + 1
    if task == "nlvr":  # the NLVR2 encoder duplicates each fusion layer: store the base depth
        n_layers = fusion + (n_layers - fusion) // 2
    t.update(vocab_size=words.shape[0], hidden_size=words.shape[1], num_layers=n_layers,
             fusion_layer=fusion,
             num_heads=text_heads or max(1, words.shape[1] // 64),
             intermediate_size=sd["model.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
             max_position_embeddings=sd["model.text_encoder.embeddings.position_embeddings.weight"].shape[0],
             encoder_width=v["width"],
             type_vocab_size=sd["model.text_encoder.embeddings.token_type_embeddings.weight"].shape[0]
             if "model.text_encoder.embeddings.token_type_embeddings.weight" in sd else 0)
    base["embed_dim"] = sd["model.vision_proj.weight"].shape[0] if "model.vision_proj.weight" in sd else base["embed_dim"]
    if "queue.image_queue" in sd:
        base["queue_size"] = sd["queue.image_queue"].shape[1]
    return ALBEFConfig.from_dict(base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the authors' checkpoint (.pth), wrapped {'model': ...} or bare")
    p.add_argument("dst", help="output folder (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--preset", default="albef-base", help="preset for what tensors cannot tell (dropout, text settings)")
    p.add_argument("--image-size", type=int, help="resize the position table to this resolution")
    p.add_argument("--vision-heads", type=int, help="ViT attention heads (default: width / 64)")
    p.add_argument("--text-heads", type=int, help="BERT attention heads (default: hidden / 64)")
    p.add_argument("--task", choices=["auto", "albef", "vqa", "ve", "nlvr"], default="auto",
                   help="which model the checkpoint holds (auto: from its keys)")
    args = p.parse_args(argv)
    sd = read_state_dict(args.src)
    task = detect_task(sd) if args.task == "auto" else args.task
    cfg = config_from_state_dict(sd, args.preset, args.image_size, args.vision_heads, args.text_heads, task)
    model = build_for_task(task, cfg, sd)
    report = load_albef(model, sd, args.src)
    save_pretrained(model, args.dst)
    print(report)
    print(f"wrote {args.dst}: {type(model).__name__} (task {task}, image size {cfg.vision.image_size}, "
          f"{cfg.text.num_layers} text layers, fusion from {cfg.text.fusion_layer})")
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
        n_dec = 1 + max(int(m.group(1)) for k in sd if (m := re.search(r"text_decoder\.(?:bert\.)?encoder\.layer\.(\d+)\.", k)))
        return ALBEFForVQA(cfg, n_dec)
    if task in ("ve", "nlvr"):
        return ALBEFForClassification(cfg, _cls_classes(sd), 2 if task == "nlvr" else 1)
    has_mlm = any(k.startswith(("text_encoder.cls.", "model.mlm_head.")) for k in sd)
    return ALBEF(cfg, mlm_head=has_mlm)


if __name__ == "__main__":
    sys.exit(main())
