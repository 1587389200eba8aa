"""``albef demo``: a short pretraining run on generated shapes, then zero-shot retrieval.

It shows the whole pretraining objective at work on a CPU in a minute or two: ITC, ITM on hard
negatives and MLM with momentum distillation, followed by image→text and text→image R@1 on
held-out generated pairs, before and after training, next to chance.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm import tqdm

from albef.config import get_preset
from albef.data.synthetic import make_shapes
from albef.models.albef import ALBEF
from albef.recipes import TrainSection
from albef.text import Tokenizer
from albef.training.pretrain import ALBEFPretrainer


@torch.no_grad()
def recall_at_1(
    model: ALBEF, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, captions: list[str]
) -> tuple[float, float]:
    """ITC R@1 both ways; a retrieved text counts as right when it reads the same as the truth."""
    model.eval()
    sim = model.similarity(images, ids, mask)  # [N, N]
    same = torch.tensor([[a == b for b in captions] for a in captions])
    i2t = same[torch.arange(len(captions)), sim.argmax(1)].float().mean().item()
    t2i = same[torch.arange(len(captions)), sim.argmax(0)].float().mean().item()
    model.train()
    return i2t, t2i


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="albef-tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--queue-size", type=int, default=64, help="ITC queue length (a multiple of the batch size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = get_preset(args.preset)
    cfg.text.hidden_dropout = cfg.text.attention_dropout = 0.0
    cfg.queue_size = args.queue_size
    tok = Tokenizer(add_sep=cfg.add_sep)
    trainer = ALBEFPretrainer(ALBEF(cfg))
    params = [p for p in trainer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.02)

    g = torch.Generator().manual_seed(args.seed)
    test_images, test_caps = make_shapes(128, cfg.vision.image_size, torch.Generator().manual_seed(10_000 + args.seed))
    test_tok = tok(test_caps, max_length=cfg.max_text_len)
    n_distinct = len(set(test_caps))
    before = recall_at_1(trainer.model, test_images, test_tok.input_ids, test_tok.attention_mask, test_caps)

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretrain (generated shapes)", unit="step")
    for step in bar:
        images, caps = make_shapes(args.batch_size, cfg.vision.image_size, g)
        batch = tok(caps, max_length=cfg.max_text_len)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        alpha = TrainSection.alpha * min(1.0, step / max(1, args.steps // 3))
        out = trainer(images, batch.input_ids, batch.attention_mask, alpha=alpha, generator=g, enqueue=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.queue.enqueue(out.teacher.image_feat, out.teacher.text_feat)  # after the step, as the loop does
        bar.set_postfix(
            itc=f"{out.itc.loss.item():.3f}",
            itm=f"{out.itm.loss.item():.3f}",
            mlm=f"{out.mlm.loss.item():.3f}",
            alpha=f"{alpha:.2f}",
        )
    elapsed = time.perf_counter() - start

    after = recall_at_1(trainer.model, test_images, test_tok.input_ids, test_tok.attention_mask, test_caps)
    chance = sum(test_caps.count(c) for c in test_caps) / len(test_caps) ** 2
    print(
        f"\n{args.steps} steps of batch {args.batch_size} in {elapsed:.1f}s "
        f"({args.steps * args.batch_size / elapsed:.1f} samples/s), preset {args.preset}"
    )
    print(f"held-out pairs: {len(test_caps)} ({n_distinct} distinct captions); chance R@1 ~ {chance:.3f}")
    print(f"ITC R@1 image->text: {before[0]:.3f} before, {after[0]:.3f} after")
    print(f"ITC R@1 text->image: {before[1]:.3f} before, {after[1]:.3f} after")
    return 0
