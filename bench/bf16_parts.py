"""What each bf16 piece of the speed layer saves in a CPU pretraining step: the step timed in
float32, in bf16 autocast, and in bf16 with one piece switched off, alternating in one process
(same model, optimizer and inputs).

    .venv/bin/python bench/bf16_parts.py --preset albef-base --res 224 --batch 4
    .venv/bin/python bench/bf16_parts.py --preset albef-small --res 128 --batch 32   # the main job's

The pieces: the ViT's and text encoder's attention written out (albef.models.fast.attention), the
MLM decoder in float32 for few rows (albef.models.fast.bert.FLOAT32_DECODER_ROWS), and the forward's
weight cast reused by the backward (albef.models.fast.recompute.REUSE_FORWARD_CAST).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch
from report import machine  # bench/, beside this script

import albef.models.fast.bert as fast_bert
import albef.models.fast.recompute as recompute
import albef.models.fast.vit as fast_vit
from albef.cli.bench import pretraining_step


@contextmanager
def switched_off(piece: str | None):
    saved = (fast_vit.written_out_is_faster, fast_bert.FLOAT32_DECODER_ROWS, recompute.REUSE_FORWARD_CAST)
    attention_rule = fast_bert.written_out_is_faster
    if piece == "written-out attention":
        fast_vit.written_out_is_faster = fast_bert.written_out_is_faster = lambda q: False
    elif piece == "float32 MLM decoder":
        fast_bert.FLOAT32_DECODER_ROWS = 0
    elif piece == "reused weight cast":
        recompute.REUSE_FORWARD_CAST = False
    try:
        yield
    finally:
        fast_vit.written_out_is_faster, fast_bert.FLOAT32_DECODER_ROWS, recompute.REUSE_FORWARD_CAST = saved
        fast_bert.written_out_is_faster = attention_rule


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="albef-base")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timed = pretraining_step(args.preset, args.res, args.batch, args.text_len, torch.device("cpu"), in_backward=True)

    def step(bf16: bool, piece: str | None) -> float:
        with switched_off(piece):
            return timed("bf16" if bf16 else "fp32")

    variants = {
        "float32": (False, None),
        "bf16": (True, None),
        "bf16 without written-out attention": (True, "written-out attention"),
        "bf16 without float32 MLM decoder": (True, "float32 MLM decoder"),
        "bf16 without reused weight cast": (True, "reused weight cast"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for v in variants.values():  # warm-up
        step(*v)
    for _ in range(args.rounds):
        for k, v in variants.items():
            times[k].append(step(*v))
    fp32 = statistics.median(times["float32"])
    bf16 = statistics.median(times["bf16"])
    print(
        f"{machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"{args.preset} res {args.res} batch {args.batch}; medians of {args.rounds} alternating rounds"
    )
    print("| step | s/step | float32 / this | this - bf16 |\n|---|---|---|---|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m:.3f} | {fp32 / m:.2f}x | {m - bf16:+.3f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
