"""``albef bench``: time one full pretraining step (forward, backward, AdamW as the training loop sets it up).

Random images and random captions (lengths drawn between 8 and ``--text-len`` word pieces, padded
to the longest in the batch, as the data pipeline does) through :class:`ALBEFPretrainer` with
distillation on (α = 0.4, so the teacher's MLM pass is included). Prints the median step time,
samples/s and peak memory (CUDA: allocator peak; CPU: peak resident set size of the process).

``--precision`` autocasts the step (bf16 on CUDA and on the CPU, fp16 on CUDA; weights and AdamW
state stay float32, as in training); several values time them in the same process, alternating in
``--rounds`` rounds, and print the ratio of their median step times.

Example:
    albef bench --preset albef-base --image-size 224 --batch-size 4 --threads 2
    albef bench --preset albef-small --image-size 64 --batch-size 32 --queue-size 1024 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from albef.config import get_preset
from albef.heap import tune_for_training
from albef.models.albef import ALBEF
from albef.training.optim import build_optimizer, one_process_in_backward
from albef.training.pretrain import ALBEFPretrainer


def proc_memory_mb(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set, in MB, from
    /proc/self/status. Not ``ru_maxrss``: that survives ``execve``, so a child started by
    ``subprocess`` would report its parent's peak. Falls back to it where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    return proc_memory_mb("VmHWM")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="albef-base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-len", type=int, default=30, help="longest caption in word pieces")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="autocast dtype (the same as --precision fp32 / bf16 / fp16)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="autocast precision of the step (default: --dtype's); several: timed alternately",
    )
    p.add_argument("--rounds", type=int, default=3, help="with several --precision values: alternating rounds")
    p.add_argument("--queue-size", type=int, help="ITC queue entries (default: the preset's, a multiple of the batch)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.add_argument(
        "--what",
        choices=["step", "rerank"],
        default="step",
        help="step: a pretraining step; rerank: ITM re-ranking, batched vs the reference's per-query loop",
    )
    p.add_argument("--gallery", type=int, default=32, help="rerank: images in the gallery (5 captions each)")
    p.add_argument("--k", type=int, default=16, help="rerank: shortlist size")
    p.add_argument(
        "--optimizer-in-backward",
        choices=["auto", "true", "false"],
        default="auto",
        help="the training loop's train.optimizer_in_backward (auto: on, for this one-process step, "
        "unless --dtype float16)",
    )
    p.add_argument(
        "--keep-freed-memory",
        choices=["auto", "true", "false"],
        default="auto",
        help="the training loop's train.keep_freed_memory (auto: on, on the CPU; albef/heap.py)",
    )
    p.add_argument(
        "--flops", action="store_true", help="count the FLOPs of one step (torch.utils.flop_counter) instead of timing"
    )
    args = p.parse_args(argv)
    if args.what == "rerank":
        return bench_rerank(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    B = args.batch_size
    keep = {"true": True, "false": False}.get(args.keep_freed_memory, "auto")
    kept = tune_for_training(keep, dev.type == "cpu", grad_checkpointing=False)  # as the loop, before the model
    rss_before = _peak_rss_mb()
    from albef.precision import resolve_precision

    asked = args.precision or [{"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, "fp32")]
    precisions = list(dict.fromkeys(resolve_precision(x, dev, "--precision") for x in asked))
    in_backward = one_process_in_backward(args.optimizer_in_backward, "fp16" if "fp16" in precisions else "fp32")
    timed = pretraining_step(args.preset, args.image_size, B, args.text_len, dev, in_backward, args.queue_size)

    def step(precision: str = precisions[0]) -> float:
        return timed(precision)

    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        per_sample = fc.get_total_flops() / B
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "image_size": args.image_size,
                    "batch_size": B,
                    "text_len": args.text_len,
                    "gflop_per_sample": round(per_sample / 1e9, 2),
                }
            )
            if args.json
            else f"{args.preset} res {args.image_size}: {per_sample / 1e9:.1f} GFLOP per sample "
            f"(student forward + backward, teacher forward; captions up to {args.text_len} tokens)"
        )
        return 0
    if len(precisions) > 1:
        return _alternate(args, precisions, step, dev, in_backward, kept)
    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precisions[0], "float32")
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    result = {
        "preset": args.preset,
        "image_size": args.image_size,
        "batch_size": B,
        "threads": args.threads,
        "device": str(dev),
        "dtype": dtype,
        "precision": precisions[0],
        "median_step_s": round(median, 4),
        "samples_per_s": round(B / median, 3),
        "peak_memory_mb": round(peak, 1),
        "rss_before_model_mb": round(rss_before, 1),
        "steps": args.steps,
        "optimizer_in_backward": in_backward,
        "keep_freed_memory": kept,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.preset} res {args.image_size} batch {B} on {dev} ({result['dtype']}, {args.threads} threads): "
            f"median step {median:.3f}s over {args.steps} steps, {B / median:.2f} samples/s, "
            f"peak memory {peak:.0f} MB ({'CUDA allocator' if dev.type == 'cuda' else 'process RSS'}); "
            f"AdamW {'in the backward' if in_backward else 'after the backward'}"
        )
    return 0


def pretraining_step(
    preset: str,
    image_size: int,
    batch_size: int,
    text_len: int,
    device: torch.device,
    in_backward: bool,
    queue_size: int | None = None,
) -> Callable[[str], float]:
    """A timed pretraining step on random images and captions: ``step(precision)`` runs one
    (forward under that autocast, backward, AdamW as the training loop sets it up, the queue
    update after the step) and returns its seconds. The same model, optimizer and inputs for
    every call, so steps in different precisions differ only in the autocast."""
    from albef.precision import autocast_dtype

    cfg = get_preset(preset)
    cfg.vision.image_size = image_size
    B = batch_size
    cfg.queue_size = max(B, ((queue_size or cfg.queue_size) // B) * B)
    trainer = ALBEFPretrainer(ALBEF(cfg)).to(device).train()
    opt = build_optimizer(trainer, lr=1e-4, weight_decay=0.02, in_backward=in_backward)  # the training loop's
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, image_size, image_size, generator=g).to(device)
    lengths = torch.randint(8, text_len + 1, (B,), generator=g)
    lengths[0] = text_len
    ids = torch.randint(1000, 30000, (B, text_len), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids, mask = (ids * mask).to(device), mask.to(device)
    cuda = device.type == "cuda"

    def step(precision: str) -> float:
        amp_dtype = autocast_dtype(precision)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = trainer(images, ids, mask, alpha=0.4, generator=None if cuda else g, enqueue=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.queue.enqueue(out.teacher.image_feat, out.teacher.text_feat)  # after the step, as the loop does
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def _alternate(
    args: argparse.Namespace, precisions: list[str], step, dev: torch.device, in_backward: bool, kept: bool
) -> int:
    """Time each precision in turn, ``args.rounds`` times (``args.warmup`` untimed steps before each
    block, ``args.steps`` timed): the same model, optimizer and inputs, so only the autocast differs."""
    times: dict[str, list[float]] = {x: [] for x in precisions}
    for _ in range(args.rounds):
        for x in precisions:
            for _ in range(args.warmup):
                step(x)
            times[x] += [step(x) for _ in range(args.steps)]
    med = {x: statistics.median(t) for x, t in times.items()}
    base = med[precisions[0]]
    result = {
        "preset": args.preset,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": str(dev),
        "rounds": args.rounds,
        "steps": args.steps,
        "median_step_s": {x: round(m, 4) for x, m in med.items()},
        "samples_per_s": {x: round(args.batch_size / m, 3) for x, m in med.items()},
        "speedup_vs_" + precisions[0]: {x: round(base / m, 3) for x, m in med.items()},
        "optimizer_in_backward": in_backward,
        "keep_freed_memory": kept,
        "torch": torch.__version__,
    }
    if dev.type == "cpu":
        from albef.precision import cpu_bf16_features

        result["cpu_bf16"] = list(cpu_bf16_features())
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.preset} res {args.image_size} batch {args.batch_size} on {dev} ({args.threads} threads), "
            f"{args.rounds} alternating rounds of {args.steps} steps: "
            + ", ".join(f"{x} median step {m:.3f}s ({base / m:.2f}x)" for x, m in med.items())
        )
    return 0


def bench_rerank(args: argparse.Namespace) -> int:
    """ITM pairs per second of the batched re-ranking and of the per-query loop, same gallery."""
    from albef.evaluation.retrieval import embed_gallery, rerank, rerank_per_query
    from albef.text import Tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    cfg.vision.image_size = args.image_size
    dev = torch.device(args.device)
    model = ALBEF(cfg, mlm_head=False).to(dev).eval()
    n_img, k = args.gallery, args.k
    words = ["a", "dog", "cat", "red", "man", "on", "the", "street", "riding", "bike", "two", "people"]
    g_ = torch.Generator().manual_seed(1)
    texts = [
        " ".join(
            words[int(j)]
            for j in torch.randint(len(words), (int(torch.randint(6, 16, (1,), generator=g_)),), generator=g_)
        )
        for _ in range(5 * n_img)
    ]
    with torch.no_grad():
        g = embed_gallery(
            model,
            torch.randn(n_img, 3, args.image_size, args.image_size),
            texts,
            Tokenizer(),
            batch_size=16,
            device=dev,
        )
        n_pairs = k * (n_img + len(texts))  # what the per-query loop evaluates
        rerank(model, g, k)  # warm-up
        t0 = time.perf_counter()
        _, a, b = rerank(model, g, k)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        ra, rb = rerank_per_query(model, g, k)
        t_loop = time.perf_counter() - t0
    diff = max((a - ra).abs().max().item(), (b - rb).abs().max().item())
    result = {
        "what": "rerank",
        "preset": args.preset,
        "image_size": args.image_size,
        "images": n_img,
        "texts": len(texts),
        "k": k,
        "pairs": n_pairs,
        "batched_s": round(t_batched, 3),
        "per_query_s": round(t_loop, 3),
        "batched_pairs_per_s": round(n_pairs / t_batched, 1),
        "per_query_pairs_per_s": round(n_pairs / t_loop, 1),
        "speedup": round(t_loop / t_batched, 2),
        "max_score_difference": diff,
        "threads": args.threads,
        "device": str(dev),
    }
    print(
        json.dumps(result)
        if args.json
        else f"ITM re-ranking, {args.preset} res {args.image_size}, {n_img} images x {len(texts)} texts, k={k}: "
        f"batched {n_pairs / t_batched:.1f} pairs/s, per-query loop {n_pairs / t_loop:.1f} pairs/s "
        f"({t_loop / t_batched:.2f}x), max score difference {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
