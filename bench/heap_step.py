"""What the training loop's heap setting (albef.heap.keep_freed_memory, ``train.keep_freed_memory``)
does to a CPU pretraining step: the step timed in float32 and bf16 with glibc's default heap and
with freed memory kept, each setting in fresh processes (the setting is process-wide and cannot be
undone), the settings alternating.

    .venv/bin/python bench/heap_step.py --preset albef-base --res 224 --batch 4
    .venv/bin/python bench/heap_step.py --preset albef-small --res 128 --batch 32   # the main job's

Per setting: the median step time over its processes, the median of minor page faults a step (pages
the kernel mapped in, zeroed) and the largest peak resident set of its processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from report import machine  # bench/, beside this script

SETTINGS = ("glibc default", "freed memory kept")
PRECISIONS = ("fp32", "bf16")


def child(args: argparse.Namespace) -> dict:
    """One process: the setting, then warm-up and ``args.steps`` steps of each precision in turn."""
    from albef.cli.bench import pretraining_step
    from albef.heap import keep_freed_memory

    if args.child == SETTINGS[1] and not keep_freed_memory():
        raise SystemExit("glibc refused the setting (or this is not glibc)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timed = pretraining_step(args.preset, args.res, args.batch, args.text_len, torch.device("cpu"), in_backward=True)
    for p in PRECISIONS:
        timed(p)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    faults: dict[str, list[int]] = {p: [] for p in PRECISIONS}
    for _ in range(args.steps):
        for p in PRECISIONS:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[p].append(timed(p))
            faults[p].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "time": {p: statistics.median(v) for p, v in times.items()},
        "faults": {p: statistics.median(v) for p, v in faults.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="albef-base")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--processes", type=int, default=2, help="fresh processes per setting")
    p.add_argument("--steps", type=int, default=4, help="timed steps per precision in each process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    passed = list(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.processes):
        for s in SETTINGS:
            out = subprocess.run(
                [sys.executable, __file__, *passed, "--child", s], capture_output=True, text=True, check=True
            )
            runs[s].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(s: str, key: str, prec: str) -> float:
        return statistics.median(r[key][prec] for r in runs[s])

    print(
        f"{machine()}, {args.threads} threads, torch {torch.__version__}; {args.preset} res {args.res} "
        f"batch {args.batch}; {args.processes} processes per setting, {args.steps} steps per precision each"
    )
    print("| heap | fp32 s/step | bf16 s/step | fp32 / bf16 | faults/step fp32 / bf16 | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for s in SETTINGS:
        f32, b16 = med(s, "time", "fp32"), med(s, "time", "bf16")
        faults = f"{med(s, 'faults', 'fp32'):,.0f} / {med(s, 'faults', 'bf16'):,.0f}"
        rss = max(r["peak_rss_mb"] for r in runs[s])
        print(f"| {s} | {f32:.3f} | {b16:.3f} | {f32 / b16:.2f}x | {faults} | {rss:,.0f} |")
    for prec in PRECISIONS:
        ratio = med(SETTINGS[0], "time", prec) / med(SETTINGS[1], "time", prec)
        print(f"{prec}: the step with freed memory kept is {ratio:.3f}x as fast as with glibc's default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
