"""How a CPU training process uses glibc's heap: keep freed memory for the next step, or give it
back to the OS.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves blocks above a threshold (at
most 32 MB) with a fresh ``mmap`` and unmaps them on ``free``, and gives a freed heap top back to
the OS. A training step allocates and frees the same large activations, gradients and bf16
weight copies every step, so every step the kernel maps them again and faults them in, zeroed,
page by page (tens of thousands of minor faults a step at albef-base).

- :func:`keep_freed_memory` (``mallopt``) serves blocks up to 256 MB from the heap and keeps up to
  1 GB of freed top: the next step reuses the pages. The step is 2-6 % faster in float32 and bf16
  and the peak resident set stays the same (``bench/heap_step.py``). The training loop sets it on
  the CPU unless gradient checkpointing is on (:func:`tune_for_training`).
- :func:`release_freed_memory` (``malloc_trim``) returns every wholly free page instead: with
  gradient checkpointing, which already trades time for memory, the loop trims after each
  optimizer step (:func:`release_after_step`) and the peak resident set drops for a few per cent
  of a step. The memory probe of ``bench/compare.py`` trims as the loop does.

Both are process-wide and do nothing without glibc (macOS, Windows, musl) or under another
allocator (``LD_PRELOAD``).

Example:
    >>> release_freed_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT_BLOCK = 256 << 20  # the largest block served from the heap: the word table's bf16 copy is 47 MB
KEPT_TOP = 1 << 30  # freed heap top kept before any is given back
OLDER_GLIBC_MAX_BLOCK = 32 << 20  # HEAP_MAX_SIZE / 2: the largest mmap threshold some glibc versions accept


@functools.cache
def _libc_function(name: str, argtypes: tuple):
    lib = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _malloc_trim():
    return _libc_function("malloc_trim", (ctypes.c_size_t,))


def _mallopt():
    return _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))


def release_freed_memory() -> bool:
    """``malloc_trim(0)``; True if glibc released any memory, False if none or not glibc."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def keep_freed_memory(max_block: int = KEPT_BLOCK, kept_top: int = KEPT_TOP) -> bool:
    """Serve blocks up to ``max_block`` bytes from the heap and keep ``kept_top`` bytes of freed
    heap top (module docstring). True if glibc took both settings.

    The trim threshold is set only once the mmap threshold is: glibc fixes the mmap threshold
    wherever either is set, and a trim threshold alone leaves it at 128 KB, which maps most of a
    step's tensors afresh (a step 30 % slower).
    """
    fn = _mallopt()
    if fn is None:
        return False
    if not (fn(M_MMAP_THRESHOLD, max_block) or fn(M_MMAP_THRESHOLD, min(max_block, OLDER_GLIBC_MAX_BLOCK))):
        return False
    return bool(fn(M_TRIM_THRESHOLD, kept_top))


def tune_for_training(setting: bool | str, on_cpu: bool, grad_checkpointing: bool) -> bool:
    """``train.keep_freed_memory``: ``"auto"`` keeps freed memory on the CPU without gradient
    checkpointing (which gives it back instead, :func:`release_after_step`); ``True`` / ``False``
    to force. True if the setting was applied."""
    if setting == "auto":
        setting = on_cpu and not grad_checkpointing
    elif not isinstance(setting, bool):
        raise ValueError(f"train.keep_freed_memory must be true, false or auto, not {setting!r}")
    return setting and keep_freed_memory()


def release_after_step(on_cpu: bool, grad_checkpointing: bool) -> bool:
    """The training loop's policy (module docstring): trim on the CPU with checkpointing only."""
    return on_cpu and grad_checkpointing and release_freed_memory()
