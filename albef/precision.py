"""Mixed precision for training and inference: ``fp32``, ``bf16``, ``fp16`` or ``auto``.

``bf16`` / ``fp16`` mean autocast (``torch.autocast``) around the forward passes: float32 weights
(and, in training, float32 gradients and optimizer state), matrix products in the low-precision
dtype, losses and returned scores in float32. ``bf16`` runs on CUDA and on the CPU; ``fp16`` is
CUDA-only (it needs a loss scaler, and CPUs have no fast float16 path). ``auto`` picks ``bf16``
only where the hardware has native bfloat16 arithmetic (:func:`native_bf16`) and ``fp32``
elsewhere, never ``bf16`` on a CPU that would emulate it.

Example:
    >>> resolve_precision("fp32", "cpu")
    'fp32'
    >>> with autocast("cpu", "bf16"):                                   # doctest: +SKIP
    ...     scores = model(...)
"""

from __future__ import annotations

import functools
import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

log = logging.getLogger("albef.precision")

#: what ``train.precision`` and every ``--precision`` accept (the inference commands offer fp32 / bf16 / auto)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
INFERENCE_PRECISIONS = ("fp32", "bf16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: /proc/cpuinfo flags of native bfloat16 arithmetic on x86: AVX512_BF16 (dot products and
#: conversions; Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) and AMX-BF16 (tile matrix
#: products; Intel Sapphire Rapids on)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):  # x86: "flags : fpu vme ... avx512_bf16 ..."
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native-bfloat16 features of this CPU, e.g. ``("avx512_bf16",)``; empty when it has none.

    How it detects: PyTorch's own CPUID probes where this PyTorch has them
    (``torch.cpu._is_avx512_bf16_supported()``, ``torch.cpu._is_amx_tile_supported()``; they also
    check that the OS enabled the AVX-512 / AMX register state), joined with the ``flags`` line of
    ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``; Linux lists only what the kernel enabled).
    ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it names the vector ISA the kernels
    were built for (``"AVX512"`` on a Zen 4 with AVX512_BF16 and on a Skylake without it alike).
    Other architectures (e.g. Arm's BF16 extension) report nothing, so ``auto`` keeps them in float32.
    """
    found = set()
    probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    for flag, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.add(flag)
        except (RuntimeError, TypeError) as e:  # a private probe that changed: the flags below still answer
            log.debug("torch.cpu.%s failed: %s", probe, e)
    found |= _cpuinfo_flags() & set(BF16_CPU_FLAGS)
    return tuple(f for f in BF16_CPU_FLAGS if f in found)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device for which
    ``torch.cuda.is_bf16_supported()`` holds (Ampere and newer), or a CPU with AVX512_BF16 or
    AMX-BF16 (:func:`cpu_bf16_features`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_features())
    return False


def _why(device: torch.device) -> str:
    if device.type == "cpu":
        feats = cpu_bf16_features()
        return (
            f"the CPU has {' and '.join(f.upper() for f in feats)}"
            if feats
            else "the CPU has neither AVX512_BF16 nor AMX-BF16"
        )
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} {'has' if native_bf16(device) else 'lacks'} native bf16"
    return f"{device.type} is not a CUDA device or CPU"


def resolve_precision(precision: str, device: str | torch.device, what: str = "precision", report: bool = False) -> str:
    """``precision`` (fp32 | bf16 | fp16 | auto) for ``device`` as ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``auto``: bf16 where :func:`native_bf16`, else fp32. ``fp16`` off CUDA is an error; ``bf16``
    on a CPU without native bf16 works (emulated) but warns that it is slower than float32.
    ``what`` names the setting in messages (``"train.precision"``, ``"--precision"``);
    ``report``: log the choice (the start of a run).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        chosen = "bf16" if native_bf16(device) else "fp32"
        if report:
            log.info("%s=auto: %s on %s (%s)", what, chosen, device.type, _why(device))
        return chosen
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"{what}=fp16 needs a CUDA device (float16 autocast with loss scaling); on the "
            f"{device.type} use bf16 (or auto)"
        )
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn(
            f"{what}=bf16 on a CPU without native bfloat16 ({_why(device)}): it works, emulated, "
            "but runs slower than fp32; use fp32 or auto",
            stacklevel=2,
        )
    if report:
        log.info("%s: %s on %s", what, precision, device.type)
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32."""
    return DTYPES.get(precision)


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` for a resolved precision on ``device``; a no-op for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def training_autocast(device: str | torch.device, dtype: torch.dtype | None, checkpointing: bool) -> torch.autocast:
    """``torch.autocast`` around a training forward (disabled for ``dtype=None``).

    Autocast caches the low-precision copy of each weight for the rest of the forward, so a weight
    read by several passes (the fusion layers read by ITM and MLM) is cast once. With gradient
    checkpointing the cache is off: it would keep a copy of every weight alive to the end of the
    forward (0.35 GB of bf16 weights at albef-base), while the checkpointed blocks keep none and
    cast again when they are recomputed. Casting is exact either way: the values are the same.

    >>> with training_autocast("cpu", torch.bfloat16, checkpointing=True):
    ...     torch.is_autocast_cache_enabled()
    False
    """
    return torch.autocast(
        torch.device(device).type,
        dtype=dtype or torch.float32,
        enabled=dtype is not None,
        cache_enabled=not checkpointing,
    )


def add_precision_option(parser, default: str = "fp32") -> None:
    """The ``--precision {fp32,bf16,auto}`` option of the inference commands."""
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default=default,
        help="fp32; bf16: autocast to bfloat16 around the forward passes (scores in float32); "
        "auto: bf16 where the GPU or CPU has native bfloat16 (AVX512_BF16 / AMX), else fp32 "
        f"(default {default})",
    )


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (Ampere and newer). PyTorch 1.7-1.11, the
    authors' 1.8 among them, enabled both by default; later versions enable neither."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
