"""Where a pretraining step's time goes, ours and the reference's (LAVIS), each alone in a fresh
process: wall time, user and system CPU seconds and minor page faults per step (``getrusage``), and
one profiled step's self CPU time by kind of op (``torch.profiler``). System time is the kernel's
share: mapping, faulting in and zeroing fresh pages, which a step that allocates large temporaries
anew pays and one whose heap has room does not.

    bench/.venv-ref/bin/python bench/profile_step.py --preset albef-base --res 224 --batch 4

Needs the reference's environment (``bash bench/setup_reference.sh``). Both sides use the steps of
``bench/compare.py`` (ours: the training loop's AdamW inside the backward; theirs: LAVIS's runner).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import config, pretrain_sides  # noqa: E402
from report import in_backward, machine  # noqa: E402

# op name -> kind, first match wins; the leaf ops carry the time (self CPU time)
KINDS = (
    ("matrix products", ("mm", "linear", "mkldnn", "matmul", "convolution")),
    ("softmax", ("softmax",)),
    ("optimizer", ("adam", "_foreach")),
    ("copies, fills, casts", ("copy_", "fill_", "zero_", "clone", "_to_copy", "cat", "stack", "empty", "contiguous")),
    ("element-wise and the rest", ("",)),
)


def kind_of(op: str) -> str:
    """The kind an op's self time counts under.

    >>> kind_of("aten::addmm"), kind_of("aten::_softmax_backward_data"), kind_of("aten::gelu")
    ('matrix products', 'softmax', 'element-wise and the rest')
    """
    name = op.removeprefix("aten::").lower()
    return next(kind for kind, keys in KINDS if any(k in name for k in keys))


def in_optimizer(event) -> bool:
    """Whether a profiled op ran inside an optimizer's step (``Optimizer.step#...``)."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measure(side: str, args: argparse.Namespace) -> dict:
    """``args.steps`` timed steps of one side after a warm-up, then one profiled step."""
    torch.set_num_threads(args.threads)
    ours, theirs, *_ = pretrain_sides(
        config(args.preset, args.res),
        args.batch,
        torch.device("cpu"),
        torch.bfloat16 if args.bf16 and side == "ours" else None,
        sides=(side,),
        in_backward=in_backward(args, None),
    )
    step = ours if side == "ours" else theirs
    step()  # warm-up: first-touch of weights and optimizer state
    u0, s0, f0 = usage()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - t0) / args.steps
    u1, s1, f1 = usage()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t1 = time.perf_counter()
        step()
        profiled = time.perf_counter() - t1
    kinds: dict[str, float] = {kind: 0.0 for kind, _ in KINDS}
    for e in prof.events():  # an optimizer's element-wise ops count as the optimizer's
        kinds["optimizer" if in_optimizer(e) else kind_of(e.name)] += e.self_cpu_time_total / 1e6
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "side": side,
        "s_per_step": wall,
        "user_s": (u1 - u0) / args.steps,
        "sys_s": (s1 - s0) / args.steps,
        "minor_faults": (f1 - f0) / args.steps,
        "profiled_step_s": profiled,
        "kinds_s": kinds,
        "outside_ops_s": profiled - sum(kinds.values()),
        "top_ops": [(e.key, e.self_cpu_time_total / 1e6) for e in top],
    }


def table(results: list[dict], args: argparse.Namespace) -> str:
    both = len(args.sides) > 1
    ours_bf16 = args.bf16 and "ours" in args.sides  # --bf16 changes only our side
    dtype = "ours in bf16 autocast" + (", the reference in float32" if both else "") if ours_bf16 else "float32"
    who = "each side" if both else {"ours": "ours", "theirs": "the reference"}[args.sides[0]]
    flags = (" --bf16" if ours_bf16 else "") + ("" if both else f" --sides {args.sides[0]}")
    head = (
        f"{machine()}, {args.threads} threads, torch {torch.__version__}; {args.preset} res {args.res} batch "
        f"{args.batch}, {dtype}, {who} alone in a fresh process: "
        f"{args.steps} timed steps after a warm-up, then "
        f"one profiled step. Command: `bench/.venv-ref/bin/python bench/profile_step.py --preset {args.preset} "
        f"--res {args.res} --batch {args.batch}{flags}`."
    )
    names = {"ours": "ours", "theirs": "reference"}
    rows = [
        ("s/step (wall)", lambda r: f"{r['s_per_step']:.3f}"),
        ("user CPU s/step", lambda r: f"{r['user_s']:.2f}"),
        ("system CPU s/step", lambda r: f"{r['sys_s']:.2f}"),
        ("minor page faults/step", lambda r: f"{r['minor_faults']:,.0f}"),
        *[(f"profiled step: {k}, s", lambda r, k=k: f"{r['kinds_s'][k]:.3f}") for k, _ in KINDS],
        ("profiled step: outside ops, s", lambda r: f"{r['outside_ops_s']:.3f}"),
        ("profiled step, s", lambda r: f"{r['profiled_step_s']:.3f}"),
    ]
    lines = [head, "", "| | " + " | ".join(names[r["side"]] for r in results) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(f(r) for r in results) + " |" for label, f in rows]
    for r in results:
        ops = ", ".join(f"{k} {s:.2f}" for k, s in r["top_ops"])
        lines.append(f"\nLargest ops, {names[r['side']]} (self CPU s in the profiled step): {ops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="albef-base")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--side", choices=["ours", "theirs"], help="measure this side here (else each in a subprocess)")
    p.add_argument("--sides", nargs="+", choices=["ours", "theirs"], default=["ours", "theirs"], help="what to measure")
    p.add_argument("--bf16", action="store_true", help="ours in bf16 autocast (the reference in float32 as it ships)")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--optimizer-in-backward",
        choices=["auto", "true", "false"],
        default="auto",
        help="ours updates the parameters in the backward (auto: as the training loop does in one process)",
    )
    args = p.parse_args(argv)
    if args.side:
        results = [measure(args.side, args)]
    else:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for side in args.sides:
                out = Path(tmp) / f"{side}.json"
                subprocess.run(
                    [sys.executable, __file__, *(argv or sys.argv[1:]), "--side", side, "--json", str(out)],
                    check=True,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"},
                )
                results += json.loads(out.read_text())
        print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
