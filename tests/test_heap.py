"""release_freed_memory gives freed heap pages back: the process's resident set shrinks."""

from __future__ import annotations

import pytest
import torch

from albef.cli.bench import proc_memory_mb
from albef.heap import _malloc_trim, release_freed_memory


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_os():
    # 3,000 blocks of 64 KB (below glibc's mmap threshold, so they live in the heap); the last
    # stays alive so the heap's top cannot be trimmed by free() itself
    blocks = [torch.ones(16 * 1024) for _ in range(3000)]
    keep = blocks.pop()
    del blocks
    held = proc_memory_mb("VmRSS")
    if not release_freed_memory():
        pytest.skip("malloc_trim released nothing: another allocator (LD_PRELOAD) serves malloc")
    after = proc_memory_mb("VmRSS")
    assert held - after > 100, (held, after)  # of the ~190 MB freed
    assert keep.sum().item() == 16 * 1024
