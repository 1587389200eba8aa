"""bench/compare.py's report: the machine, the versions and the Markdown table of its results.

Kept apart from the benchmarks so that scripts running in albef's own environment (without the
reference installed) can name the machine the same way: ``from report import machine``.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from albef.models.albef import checkpointed_parts
from albef.training.optim import one_process_in_backward

# dense tensor-core peaks from the vendor's datasheets (FLOP/s), for MFU against the chip rather
# than against the matrix multiply measured in the run
DATASHEET_PEAK = {
    "H200": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "H100 80GB HBM3": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}


def datasheet_peak(dtype: str) -> float | None:
    """The GPU's dense peak for ``dtype`` ("bfloat16", "tf32", "float32"), None when unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v[dtype] for k, v in DATASHEET_PEAK.items() if k in name), None)


def in_backward(args, amp: torch.dtype | None) -> bool:
    """Ours updates in the backward as the training loop would for this one-process step."""
    return one_process_in_backward(args.optimizer_in_backward, "bf16" if amp else "fp32")


def setup_words(args) -> list[str]:
    """Our training set-up in the table's words (empty: the ordinary step)."""
    words = []
    vision, text = checkpointed_parts(args.grad_checkpointing)
    if vision or text:
        words.append("gradient checkpointing" + ("" if text else " of the ViT"))
    if in_backward(args, None):
        words.append(
            "AdamW in the backward" + (" (the loop's default)" if args.optimizer_in_backward == "auto" else "")
        )
    return words


def machine(cpuinfo: str | None = None) -> str:
    """The CPU as ``/proc/cpuinfo`` (or the text ``cpuinfo``) names it, with its x86 family and
    model (a cloud CPU's name can hide its generation: an "AMD EPYC" of family 25 is a Zen 3 or
    Zen 4, of family 26 a Zen 5) and the native-bf16 features its flags list, e.g. "AMD EPYC
    (family 26 model 2; avx512_bf16), 2 logical CPUs". Without a "cpu family" line (Arm) only the
    name; without a name, ``platform``'s."""
    from albef.precision import BF16_CPU_FLAGS

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():  # the first processor's block ends at its blank line
            if fields:
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        flags = set(fields.get("flags", "").split())
        bf16 = ", ".join(f for f in BF16_CPU_FLAGS if f in flags) or "no AVX512/AMX bf16"
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')}; {bf16})"
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name()}"
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def versions() -> str:
    import importlib.metadata as md

    v = {p: md.version(p) for p in ("torch", "salesforce-lavis", "transformers", "timm", "numpy")}
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    return ", ".join(f"{k} {x}" for k, x in v.items()) + f", Python {platform.python_version()}{cuda}"


def interpreter() -> str:
    """The Python that ran this, as the command line to quote (relative inside the repository)."""
    exe = Path(sys.executable)
    try:
        return str(exe.absolute().relative_to(Path(__file__).absolute().parents[1]))
    except ValueError:
        return exe.name


def precision_words(r: dict) -> str:
    """The row's precisions in the table's words (empty: both float32)."""
    ours, theirs = r.get("ours_dtype"), r.get("theirs_dtype", "float32")
    if ours == "bfloat16" and theirs == "bfloat16":
        return ", **both in bf16 autocast**"
    if ours == "bfloat16":
        return ", **ours in bf16 autocast**, the reference in float32 as it ships"
    return ", ours in float32, **the reference in bf16 autocast**" if theirs == "bfloat16" else ""


def table(results: list[dict], args, peak_flops: float, dtype: str, gemm: dict | None = None, n: int = 0) -> str:
    tf32, ref_bf16 = getattr(args, "tf32", False), getattr(args, "ref_bf16", False)
    rows = ["| benchmark | setting | ours | reference | ours/ref time | other |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["ours_s"] / r["theirs_s"]
        if r["what"] == "pretrain":
            lean = setup_words(args)
            setting = (
                f"{r['preset']} res {r['res']} batch {r['batch']}"
                + (f", ours with {' and '.join(lean)}" if lean else "")
                + precision_words(r)
            )
            f_a, f_b = r["flops_per_step"], r.get("flops_per_step_theirs", r["flops_per_step"])
            probes = r.get("peak_mb_ours_all", [])
            spread = (
                f", median of {len(probes)} probes each: {min(probes):.0f}-{max(probes):.0f} / "
                f"{min(r['peak_mb_theirs_all']):.0f}-{max(r['peak_mb_theirs_all']):.0f}"
                if len(probes) > 1
                else ""
            )
            bf16 = r.get("ours_dtype") == "bfloat16"
            pk_a = gemm[torch.bfloat16] if bf16 and gemm else peak_flops  # each side's MFU against its own dtype's rate
            pk_b = gemm[torch.bfloat16] if r.get("theirs_dtype") == "bfloat16" and gemm else peak_flops
            fp32 = next(
                (
                    q
                    for q in results
                    if q["what"] == "pretrain"
                    and q.get("ours_dtype") != "bfloat16"
                    and (q["preset"], q["res"], q["batch"]) == (r["preset"], r["res"], r["batch"])
                ),
                None,
            )
            speedup = (
                f"ours bf16 step {fp32['ours_s'] / r['ours_s']:.2f}x faster than ours float32 "
                f"({fp32['ours_s']:.3f} s, row above); "
                if bf16 and fp32
                else ""
            )
            other = speedup + (
                f"peak memory {r['peak_mb_ours']:.0f} / {r['peak_mb_theirs']:.0f} MB "
                f"({r['peak_mb_ours'] / r['peak_mb_theirs']:.2f}x{spread}); "
                f"MFU {100 * f_a / r['ours_s'] / pk_a:.1f} % / "
                f"{100 * f_b / r['theirs_s'] / pk_b:.1f} % (own FLOPs: {f_a / 1e9:.0f} / {f_b / 1e9:.0f} "
                f"GFLOP/step; theirs on our {f_a / 1e9:.0f}: {100 * f_a / r['theirs_s'] / pk_b:.1f} %); "
                f"{r['batch'] / r['ours_s']:.2f} / {r['batch'] / r['theirs_s']:.2f} samples/s; steps "
                f"{min(r['ours_all']):.3f}-{max(r['ours_all']):.3f} / {min(r['theirs_all']):.3f}-"
                f"{max(r['theirs_all']):.3f} s"
            )
            sheet = datasheet_peak("bfloat16" if bf16 else "tf32" if tf32 else "float32")
            if sheet and args.device == "cuda":  # the chip's own peak, the usual denominator of MFU
                kind = "bf16" if bf16 else "TF32" if tf32 else "float32"
                other += (
                    f"; MFU of the datasheet's dense {kind} peak ({sheet / 1e12:.0f} TFLOP/s): "
                    f"{100 * f_a / r['ours_s'] / sheet:.1f} % / {100 * f_b / r['theirs_s'] / sheet:.1f} %"
                )
            if "alone_s_ours" in r:  # the memory probes' own steps; ours there trims as our loop does
                other += (
                    f"; each side alone in its memory probe: {r['alone_s_ours']:.3f} / {r['alone_s_theirs']:.3f} "
                    f"s/step"
                    + (
                        " (ours with the loop's heap trim)"
                        if any(checkpointed_parts(args.grad_checkpointing)) and args.device == "cpu"
                        else ""
                    )
                )
            cells = f"{r['ours_s']:.3f} s/step | {r['theirs_s']:.3f} s/step"
        elif r["what"] == "retrieval":
            setting = f"{r['preset']} res {r['res']}, {r['images']} images x {r['texts']} texts, k={r['k']}" + (
                precision_words(r)
            )
            cells = f"{r['pairs'] / r['ours_s']:.1f} ITM pairs/s | {r['pairs'] / r['theirs_s']:.1f} ITM pairs/s"
            other = (
                f"{r['theirs_s'] / r['ours_s']:.2f}x pairs/s; whole evaluation {r['ours_s']:.2f} / "
                f"{r['theirs_s']:.2f} s; same weights: max score difference over shared pairs "
                f"{r['max_abs_score_diff']:.1e} "
                f"(ours {r['ours_dtype']}, theirs {r.get('theirs_dtype', 'float32')}), same top-1 for "
                f"{100 * r['top1_agreement']:.1f} % of queries"
            )
        else:
            setting = (
                f"{r['preset']} res {r['res']}, {r['questions']} questions, {r['answers']} answers, "
                f"k={r['k']}" + precision_words(r)
            )
            cells = f"{r['ours_s']:.3f} s | {r['theirs_s']:.3f} s"
            other = f"{r['questions'] / r['ours_s']:.2f} / {r['questions'] / r['theirs_s']:.2f} questions/s"
        rows.append(f"| {r['what']} | {setting} | {cells} | {ratio:.2f}x | {other} |")
    small_rows = any(r["what"] == "pretrain" and r.get("reps", args.reps) != args.reps for r in results)
    theirs = "bf16 autocast for the reference" if ref_bf16 else "the reference as it ships"
    head = (
        f"Machine: {machine()}; {args.threads} threads; {versions()}; device {args.device} ({dtype} for ours"
        f"{f', {theirs}' if args.device == 'cuda' else ''}{'; TF32 matrix multiplies on both sides' if tf32 else ''}"
        "). Matrix-multiply throughput measured "
        f"in the same run (best of before and after, {n}x{n}): "
        + (
            ", ".join(f"{v / 1e9:.1f} GFLOP/s {str(d).removeprefix('torch.')}" for d, v in gemm.items())
            if gemm
            else f"{peak_flops / 1e9:.1f} GFLOP/s ({dtype})"
        )
        + f" (MFU against the {dtype} rate). Medians of {args.reps} (training"
        f"{f'; {args.small_reps} for the CPU-sized preset' if small_rows else ''}) / "
        f"{args.reps_eval} (evaluation) alternating rounds after a warm-up. Command: "
        f"`{shlex.join([interpreter(), 'bench/compare.py'] + sys.argv[1:])}`."
    )
    return head + "\n\n" + "\n".join(rows) + "\n"
