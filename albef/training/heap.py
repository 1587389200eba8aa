"""Give the heap pages a CPU training step freed back to the OS (glibc's ``malloc_trim``).

PyTorch's CPU tensors come from ``malloc``. glibc keeps the pages of freed blocks inside its
heap for reuse, and over a step's thousands of allocations of many sizes that slack grows to a
few hundred MB the process holds without using. ``malloc_trim(0)`` returns every wholly free
page; the next step faults back in (and the kernel zeroes) what it needs, which is the cost.

It pays only where little is freed and refaulted each step, so the training loop trims after
each CPU optimizer step only with gradient checkpointing (:func:`release_after_step`), the
set-up that trades time for memory. Measured on the project's 2-core machine at albef-base,
res 224, batch 4, two processes each (a script timing the loop's step - forward, backward,
fused AdamW, the trim - and reading VmHWM over 7 steps): with checkpointing and AdamW in the
backward, peak 4,836 / 4,856 MB -> 4,686 / 4,790 MB at 3.71 / 3.80 -> 3.88 / 3.89 s a step
(+2-5 %); without checkpointing it saved 67 / 115 MB (5,548 / 5,619 -> 5,481 / 5,504) for
+8-10 % time (3.46 / 3.49 -> 3.77 / 3.84 s), so there it is off. Without glibc (macOS,
Windows, musl) it does nothing.

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
