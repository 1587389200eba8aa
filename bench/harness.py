"""What bench/compare.py's benchmarks share: the random inputs, the config both sides build, timing
ours and theirs alternately, the matrix-multiply rate."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from albef.config import ALBEFConfig, get_preset

WORDS = (
    "a man woman dog cat red blue small large riding sitting standing on the in of with next to "
    "street field table plate bike horse two people child green white car tree building water"
).split()


# -- inputs ---------------------------------------------------------------------------------
def captions(n: int, seed: int, max_words: int = 40) -> list[str]:
    """Random captions; the first is long enough to fill 30 word pieces, so both sides pad to 30."""
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 28))) for _ in range(n)]
    out[0] = " ".join(rng.choice(WORDS) for _ in range(max_words))
    return out


def config(preset: str, res: int) -> ALBEFConfig:
    cfg = get_preset(preset)
    cfg.vision.image_size = res
    cfg.text.type_vocab_size = 0  # LAVIS has no token-type table
    return cfg


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def alternate(ours: Callable, theirs: Callable, dev: torch.device, reps: int, warmup: int = 1) -> tuple[list, list]:
    for _ in range(warmup):
        ours(), theirs()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours, dev))
        b.append(timed(theirs, dev))
    return a, b


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_flops_per_s(dev: torch.device, dtype: torch.dtype, n: int) -> float:
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    x @ y
    best = min(timed(lambda: x @ y, dev) for _ in range(10))
    return 2 * n**3 / best


def ref_amp(args, dev: torch.device) -> torch.dtype | None:
    """The reference's autocast dtype: None (float32, as it ships) unless ``--ref-bf16``."""
    return torch.bfloat16 if args.ref_bf16 else None
