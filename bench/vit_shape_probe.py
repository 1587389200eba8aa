"""How many steps does a from-scratch ViT need to tell easy-VQA's shapes (or colours) apart?

A diagnostic for the main job, not a benchmark: the image side of ``albef-small`` at 64 px (the
main job's ViT, random weights), a linear head on its [CLS], trained as a plain classifier on the
images of one easy-VQA question type with the authors' fine-tuning augmentation (crop scale
0.5-1, flip, RandAugment; ``--no-randaugment`` and ``--crop-scale 1.0`` take them off), batch 32,
AdamW. It isolates the image encoder from everything ALBEF adds (no text, no fusion, no momentum
model).

    albef data easyvqa data/easyvqa
    .venv/bin/python bench/vit_shape_probe.py --data data/easyvqa --type shape --steps 300

Prints the held-out accuracy and chance (1 / number of classes).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from albef.config import get_preset
from albef.data.transforms import test_transform, train_transform
from albef.models.vit import VisionTransformer


def load(data: Path, split: str, qtype: str) -> list[tuple[str, str]]:
    """(image path, label) pairs of one question type, one per image."""
    qs = json.loads((data / f"vqa_{split}.json").read_text())
    # one question of the type per image: a shape/colour question names the image's only shape
    seen, out = set(), []
    for q in qs:
        if q["question_type"] == qtype and q["image"] not in seen:
            seen.add(q["image"])
            out.append((q["image"], q["answer"][0]))
    return out


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/easyvqa"))
    p.add_argument("--type", choices=["shape", "color"], default="shape")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--crop-scale", type=float, default=0.5, help="RandomResizedCrop's lower scale (main job: 0.5)")
    p.add_argument("--no-randaugment", action="store_true")
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    train, test = load(args.data, "train", args.type), load(args.data, "test", args.type)[: args.test]
    classes = sorted({a for _, a in train})
    vcfg = get_preset("albef-small").vision
    vcfg.image_size, vcfg.patch_size = 64, args.patch
    vit, head = VisionTransformer(vcfg), torch.nn.Linear(vcfg.width, len(classes))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.02)
    # uint8_wrap off: RandomAugment as the runs docs/ablation.md reports (clipped, no wrap-around)
    t_train = train_transform(64, scale=(args.crop_scale, 1.0), randaugment=not args.no_randaugment, uint8_wrap=False)
    t_test = test_transform(64)
    images: dict[str, Image.Image] = {}

    def batch(items, tf):
        for path, _ in items:
            if path not in images:
                images[path] = Image.open(args.data / path).convert("RGB")
        x = torch.stack([tf(images[path]) for path, _ in items])
        return x, torch.tensor([classes.index(a) for _, a in items])

    rng, t0 = random.Random(args.seed), time.perf_counter()
    vit.train()
    for _ in range(args.steps):
        x, y = batch(rng.sample(train, 32), t_train)
        loss = F.cross_entropy(head(vit(x)[:, 0]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vit.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 100):
            x, y = batch(test[i : i + 100], t_test)
            correct += int((head(vit(x)[:, 0]).argmax(-1) == y).sum())
    acc = 100.0 * correct / len(test)
    print(
        f"{args.type}: {len(classes)} classes, patch {args.patch}, {args.steps} steps at lr {args.lr}, "
        f"crop scale {args.crop_scale}, RandAugment {not args.no_randaugment}: held-out accuracy {acc:.1f} % "
        f"on {len(test)} images (chance {100 / len(classes):.1f} %), {time.perf_counter() - t0:.0f} s"
    )
    return acc


if __name__ == "__main__":
    main()
