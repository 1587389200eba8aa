"""albef vs the reference (LAVIS 1.0.2's ALBEF), side by side in one process per benchmark, same inputs.

Run with the reference environment (``bash bench/setup_reference.sh`` makes it):

    bench/.venv-ref/bin/python bench/compare.py --write bench/RESULTS.md      # CPU, ~12 min
    bash bench/gpu.sh                                                          # GPU figures (see there)

What is timed (medians of ``--reps`` rounds, ours and theirs alternating after a warm-up, same
threads, same config, same batch, same resolution, same random inputs; each benchmark in a fresh
process of its own, see ``run_isolated``):

* ``pretrain``: one step = forward (ITC + ITM + MLM with distillation, momentum update and queue
  push), backward, AdamW. Peak memory: fresh processes per side (model, optimiser, four steps,
  the last three timed; ``--memory-probes`` of them, alternating, median reported),
  since the two share a process here — the CUDA allocator's peak on a GPU, the peak RSS on the
  CPU. FLOPs are counted on each side's own step with ``torch.utils.flop_counter`` (same inputs:
  captions padded to the 30-token maximum; ours skips the padding and other work the losses do
  not read, so it counts fewer) and divided by the fp32 (or bf16 on GPU) matrix-multiply
  throughput measured in the same run (the higher of a measurement before and one after the
  benchmarks): model FLOP utilisation; the reference's time is also stated against our count,
  the rate of the work the losses need. Our memory probe sets the heap as our training loop
  does (albef/heap.py): on the CPU it keeps a step's freed memory for the next step, or with
  gradient checkpointing gives it back to the OS after each step; the timing rounds, which share
  one process, keep glibc's default heap (see ``pretrain_sides``).
* ``retrieval``: the whole evaluation of a gallery (embed images and texts, ITC similarities,
  top-k ITM re-ranking in both directions), ours ``embed_gallery`` + ``rerank`` (LAVIS's
  score = ITM logit + cosine, ``add_cosine=True``) against LAVIS's ``compute_sim_matrix`` (one
  fusion pass per query). ITM pairs/s = ``k (N_img + N_txt)`` / time. Both models carry the same
  weights (ours converted from LAVIS's state dict) and the score matrices are compared.
* ``vqa``: ranking a fixed answer list (k candidates per question by the first token, then the
  candidates' full likelihood), ours ``rank_answers`` against LAVIS's ``predict_answers(...,
  inference_method="rank")``.

The evaluation benchmarks live in ``compare_eval.py``, the inputs and the alternating timer both
use in ``harness.py``; this file runs the pretraining step, each job in its own process, and the
report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as R  # noqa: E402
from compare_eval import bench_retrieval, bench_vqa, scored_diff  # noqa: E402, F401  (scored_diff: tests)
from harness import alternate, captions, config, matmul_flops_per_s, ref_amp, set_tf32, timed  # noqa: E402
from report import in_backward, table  # noqa: E402

from albef.cli.bench import proc_memory_mb  # noqa: E402
from albef.cli.mdblock import write_block  # noqa: E402
from albef.config import ALBEFConfig  # noqa: E402
from albef.models.albef import checkpointed_parts  # noqa: E402
from albef.precision import training_autocast  # noqa: E402
from albef.recipes import TrainSection  # noqa: E402


# -- pretraining step ---------------------------------------------------------------------------
def pretrain_sides(
    cfg: ALBEFConfig,
    batch: int,
    dev: torch.device,
    amp: torch.dtype | None,
    sides: tuple[str, ...] = ("ours", "theirs"),
    grad_checkpointing: bool | str = False,
    in_backward: bool = False,
    trim: bool = False,
    ref_amp: torch.dtype | None = None,
):
    """(ours_step, theirs_step, ours_model, theirs_model): forward, backward and AdamW closures
    (None for a side not in ``sides``). ``trim``: our step ends as our training loop's does, which
    on the CPU with checkpointing gives the freed heap back (albef/heap.py). Only for a
    process running our side alone: the trim is process-wide, so in the shared timing process it
    would also hand back the reference's freed pages and make its next step fault them in again;
    the probe that measures our peak memory times its own steps to show what the trim costs."""
    from albef.heap import release_after_step
    from albef.models.albef import ALBEF
    from albef.text import Tokenizer
    from albef.training.optim import build_optimizer
    from albef.training.pretrain import ALBEFPretrainer

    L = R.import_lavis() if "theirs" in sides else None  # a side measured alone loads only its own code
    torch.manual_seed(0)
    ours = ALBEFPretrainer(ALBEF(cfg)).to(dev).train() if "ours" in sides else None
    theirs = R.build_pretrain(L, cfg).to(dev).train() if "theirs" in sides else None
    if ours is not None:  # memory for time: blocks recomputed in the backward
        ours.model.set_grad_checkpointing(grad_checkpointing)
    checkpointing = any(checkpointed_parts(grad_checkpointing))
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=dev)
    texts = captions(batch, seed=1)
    tok = Tokenizer(add_sep=True)(texts, max_length=cfg.max_text_len, padding="longest")
    ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
    ref = L and L.AlbefBase.init_tokenizer()(texts, padding="max_length", truncation=True, max_length=cfg.max_text_len)
    if ids.shape[1] != cfg.max_text_len or (ref is not None and ids.tolist() != ref.input_ids):
        raise RuntimeError("the two tokenizers disagree on the benchmark captions; the comparison would be unfair")
    samples = {"image": images, "text_input": texts, "epoch": 1, "iters": 0, "num_iters_per_epoch": 1}

    def step(model, run):
        if model is None:
            return None
        if model is ours:  # each side's own optimiser set-up: ours is the training loop's
            opt = build_optimizer(model, lr=1e-4, weight_decay=0.02, in_backward=in_backward)
        else:  # LAVIS's runner: torch.optim.AdamW with its defaults
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)

        # the reference runs as it ships (float32) unless ``ref_amp`` puts it under autocast too
        side_amp = amp if model is ours else ref_amp

        def go():  # both training loops: forward, backward, step, then drop the gradients
            # ours as the training loop: autocast's weight cache off with checkpointing (albef.precision)
            with training_autocast(dev, side_amp, checkpointing and model is ours):
                loss, after = run(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if trim and model is ours:
                release_after_step(dev.type == "cpu", checkpointing)
            after()

        return go

    def run_ours(m):  # as albef.training.loop: the momentum features are enqueued after the step
        out = m(images, ids, mask, alpha=TrainSection.alpha, enqueue=False)
        return out.loss, lambda: m.queue.enqueue(out.teacher.image_feat, out.teacher.text_feat)

    return (step(ours, run_ours), step(theirs, lambda m: (m(samples).loss, lambda: None)), ours, theirs)


def step_flops(step: Callable) -> float:
    """FLOPs of one step (NaN, with the error on stderr, where the counter cannot run it: the
    timings still stand)."""
    import traceback

    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            step()
    except RuntimeError:
        traceback.print_exc()
        return float("nan")
    return float(fc.get_total_flops())


def peak_rss_of(side: str, args: argparse.Namespace) -> tuple[float, float]:
    """(peak RSS in MB, median step in s) of a fresh process that builds one side and runs four
    steps (the first untimed)."""
    cmd = [
        sys.executable,
        __file__,
        "--rss-probe",
        side,
        "--preset",
        args.preset,
        "--res",
        str(args.res),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    cmd += ["--bf16"] * args.bf16 + ["--ref-bf16"] * args.ref_bf16 + ["--tf32"] * args.tf32
    cmd += ["--grad-checkpointing", args.grad_checkpointing, "--optimizer-in-backward", args.optimizer_in_backward]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    peak, step_s = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(step_s)


def bench_pretrain(args, dev, amp) -> dict:
    cfg = config(args.preset, args.res)
    ours, theirs, m_a, m_b = pretrain_sides(
        cfg,
        args.batch,
        dev,
        amp,
        grad_checkpointing=args.grad_checkpointing,
        in_backward=in_backward(args, amp),
        ref_amp=ref_amp(args, dev),
    )
    n_a = sum(p.numel() for p in m_a.parameters())
    n_b = sum(p.numel() for p in m_b.parameters())
    m_a.model.set_grad_checkpointing(False)  # model FLOPs: the recomputation is not useful work
    flops, flops_theirs = step_flops(ours), step_flops(theirs)
    m_a.model.set_grad_checkpointing(args.grad_checkpointing)
    # on a GPU the two sides share one caching allocator: more warm-up rounds let it settle (the
    # first H200 run, with one, had our bf16 steps 2-5 three times slower than steps 6-10)
    a, b = alternate(ours, theirs, dev, args.reps, warmup=3 if dev.type == "cuda" else 1)
    res = {
        "what": "pretrain",
        "preset": args.preset,
        "res": args.res,
        "batch": args.batch,
        "reps": args.reps,
        "ours_dtype": str(amp or torch.float32).removeprefix("torch."),
        "theirs_dtype": str(ref_amp(args, dev) or torch.float32).removeprefix("torch."),
        "params_ours": n_a,
        "params_theirs": n_b,
        "ours_s": statistics.median(a),
        "theirs_s": statistics.median(b),
        "ours_all": a,
        "theirs_all": b,
        "flops_per_step": flops,
        "flops_per_step_theirs": flops_theirs,
    }
    # peak memory of each side alone, in fresh processes (both share this one), alternating; the
    # median is reported: a CPU process's peak RSS moves from run to run with the heap's layout
    # (the reference's ranged 6.1-6.6 GB across single probes at albef-base)
    del m_a, m_b, ours, theirs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    probes = [{side: peak_rss_of(side, args) for side in ("ours", "theirs")} for _ in range(args.memory_probes)]
    return {**res, **probe_medians(probes)}


def probe_medians(probes: list[dict[str, tuple[float, float]]]) -> dict:
    """Memory probes ``[{side: (peak MB, step s)}]`` -> each side's medians and every value."""
    out = {}
    for side in ("ours", "theirs"):
        peaks, steps = [p[side][0] for p in probes], [p[side][1] for p in probes]
        out.update(
            {
                f"peak_mb_{side}": statistics.median(peaks),
                f"alone_s_{side}": statistics.median(steps),
                f"peak_mb_{side}_all": peaks,
                f"alone_s_{side}_all": steps,
            }
        )
    return out


def rss_probe(args) -> None:
    """One side alone: CUDA allocator peak on a GPU, peak resident set on the CPU."""
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    set_tf32(args.tf32)
    amp = torch.bfloat16 if (args.bf16 and args.rss_probe == "ours") else None
    if args.rss_probe == "ours":  # the loop's heap (albef/heap.py), before the step's first allocations
        from albef.heap import tune_for_training

        tune_for_training("auto", dev.type == "cpu", any(checkpointed_parts(args.grad_checkpointing)))
    ours, theirs, _, _ = pretrain_sides(
        config(args.preset, args.res),
        args.batch,
        dev,
        amp,
        sides=(args.rss_probe,),
        grad_checkpointing=args.grad_checkpointing,
        in_backward=in_backward(args, amp),
        trim=True,
        ref_amp=ref_amp(args, dev),
    )
    fn = ours or theirs
    fn()
    times = [timed(fn, dev) for _ in range(3)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else proc_memory_mb("VmHWM")
    print(peak, statistics.median(times))


JOBS = (
    "pretrain",
    "pretrain-small",
    "retrieval",
    "vqa",
    "pretrain@bf16",
    "pretrain-small@bf16",
    "retrieval@bf16",
    "vqa@bf16",
)


def run_job(job: str, args: argparse.Namespace, dev: torch.device, amp: torch.dtype | None) -> dict:
    if job.endswith("@bf16"):  # the same benchmark with ours in bf16 autocast (memory probes too)
        return run_job(
            job.removesuffix("@bf16"), argparse.Namespace(**{**vars(args), "bf16": True}), dev, torch.bfloat16
        )
    if job == "pretrain":
        return bench_pretrain(args, dev, amp)
    if job == "pretrain-small":
        return bench_pretrain(
            argparse.Namespace(
                **{
                    **vars(args),
                    "preset": args.small_preset,
                    "res": args.small_res,
                    "batch": args.small_batch,
                    "reps": args.small_reps,
                }
            ),
            dev,
            amp,
        )
    return bench_retrieval(args, dev, amp) if job == "retrieval" else bench_vqa(args, dev, amp)


def run_isolated(argv: list[str], job: str) -> dict:
    """One benchmark in a fresh process, both sides in it as before. In one shared process a
    benchmark inherited the heap that the ones before it had grown, and that changed the
    reference's speed more than ours: its albef-small step took 1.18-1.26 s right after the
    albef-base comparison and 1.32-1.42 s in a process of its own (ours 0.59-0.61 s in both), so
    the ratios depended on the order of the benchmarks (``--in-process`` gives that order back).
    The reference's MLM logits over every position (49 MB at albef-small) and their softmax and
    gradients are mapped afresh each step unless an already grown heap has room for them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run(
            [sys.executable, __file__, *argv, "--job", job, "--json", str(out)],
            check=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        return json.loads(out.read_text())["results"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--what", nargs="+", default=["pretrain", "retrieval", "vqa"], choices=["pretrain", "retrieval", "vqa"]
    )
    p.add_argument("--preset", default="albef-base")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--small-preset", default="albef-small", help="the CPU-sized preset also run for pretraining")
    p.add_argument("--small-res", type=int, default=128)
    p.add_argument("--small-batch", type=int, default=16)
    p.add_argument("--gallery", type=int, default=16, help="retrieval: images (5 captions each)")
    p.add_argument("--k", type=int, default=16, help="retrieval: shortlist size")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--answers", type=int, default=200)
    p.add_argument("--vqa-k", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--small-reps",
        type=int,
        default=11,
        help="rounds for the CPU-sized preset (its steps are short; more rounds steady its median)",
    )
    p.add_argument(
        "--memory-probes",
        type=int,
        default=None,
        help="fresh processes per side for peak memory, median reported (default 3 on the CPU, 1 on a GPU, "
        "where the allocator's peak does not vary)",
    )
    p.add_argument("--reps-eval", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast for ours (the reference runs as it ships)")
    p.add_argument(
        "--ref-bf16",
        action="store_true",
        help="the reference in bf16 autocast too (LAVIS's own mixed-precision path), for equal precision",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: TF32 matrix multiplies and convolutions for both sides (PyTorch 1.8's default on Ampere+)",
    )
    p.add_argument(
        "--bf16-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: each row again with ours in bf16 autocast (the reference in float32 as it ships)",
    )
    p.add_argument(
        "--grad-checkpointing",
        nargs="?",
        const="all",
        default="none",
        choices=["none", "vision", "all"],
        help="pretraining: ours recomputes encoder blocks in the backward (train.grad_checkpointing)",
    )
    p.add_argument(
        "--optimizer-in-backward",
        nargs="?",
        const="true",
        default="auto",
        choices=["auto", "true", "false"],
        help="pretraining: ours updates the parameters in the backward (train.optimizer_in_backward; "
        "auto: as the training loop, on for one process)",
    )
    p.add_argument("--write", type=Path, help="replace the comparison block of this Markdown file")
    p.add_argument("--marker", default=None, help="block name in --write (default: compare-DEVICE)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every benchmark in this one process (default: each in a fresh one; see run_isolated)",
    )
    p.add_argument("--rss-probe", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)  # one benchmark, for run_isolated
    args = p.parse_args(argv)
    for name in ("reps", "small_reps", "reps_eval", "memory_probes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return 0
    dev = torch.device(args.device)
    set_tf32(args.tf32)
    if args.memory_probes is None:
        args.memory_probes = 1 if dev.type == "cuda" else 3
    amp = torch.bfloat16 if (args.bf16 and dev.type == "cuda") else None
    dtype = "bf16 autocast" if amp else "float32"
    # measured at the start and again at the end, the higher kept: a shared machine's speed drifts,
    # and one slow moment at the start once gave an MFU over 100 %
    n = 8192 if dev.type == "cuda" else 2048
    gemm = {} if args.job else {d: matmul_flops_per_s(dev, d, n) for d in (torch.float32, torch.bfloat16)}
    pretrain_jobs = ["pretrain", "pretrain-small"] if args.small_preset else ["pretrain"]
    if args.bf16_rows and dev.type == "cpu":
        pretrain_jobs += [f"{j}@bf16" for j in pretrain_jobs]  # the reference stays float32 as it ships
    bf16_too = args.bf16_rows and dev.type == "cpu"
    jobs = (
        [args.job]
        if args.job
        else [
            j
            for what in args.what
            for j in (pretrain_jobs if what == "pretrain" else [what, f"{what}@bf16"] if bf16_too else [what])
        ]
    )
    results = []
    for job in jobs:
        if len(jobs) > 1 and not args.in_process:  # the child prints its result
            results.append(run_isolated(sys.argv[1:] if argv is None else list(argv), job))
        else:
            results.append(run_job(job, args, dev, amp))
            print(json.dumps(results[-1]), flush=True)
    if args.job:  # a child of run_isolated: its parent writes the table
        args.json.write_text(json.dumps({"results": results}))
        return 0
    gemm = {d: max(v, matmul_flops_per_s(dev, d, n)) for d, v in gemm.items()}
    peak = gemm[amp or torch.float32]
    text = table(results, args, peak, dtype, gemm, n)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "matmul_flops_per_s": peak}, indent=1))
    if args.write:
        write_block(args.write, args.marker or f"compare-{dev.type}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
