"""Give the heap pages a CPU training step freed back to the OS (glibc's ``malloc_trim``).

PyTorch's CPU tensors come from ``malloc``. glibc keeps the pages of freed blocks inside its
heap for reuse, and over a step's thousands of allocations of many sizes that slack grows to a
few hundred MB the process holds without using. ``malloc_trim(0)`` returns every wholly free
page; the next step faults back in (and the kernel zeroes) what it needs, which is the cost.

It pays only in the set-up that already trades time for memory: with gradient checkpointing the
trim lowers the peak RSS for a few per cent of a step, while without it the saving is smaller
and the refaults cost more of the step. So the training loop trims after each CPU optimizer step
only with gradient checkpointing (:func:`release_after_step`); the memory probe of
``bench/compare.py`` trims as the loop does. Without glibc (macOS, Windows, musl) it does
nothing.

Example:
    >>> release_freed_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """``malloc_trim(0)``; True if glibc released any memory, False if none or not glibc."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def release_after_step(on_cpu: bool, grad_checkpointing: bool) -> bool:
    """The training loop's policy (module docstring): trim on the CPU with checkpointing only."""
    return on_cpu and grad_checkpointing and release_freed_memory()
