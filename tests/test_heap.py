"""albef.heap: release_freed_memory gives freed heap pages back (the resident set shrinks);
keep_freed_memory keeps them for the next allocation (no pages faulted in again)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from albef import heap
from albef.cli.bench import proc_memory_mb
from albef.heap import _malloc_trim, _mallopt, release_freed_memory


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


# Run in a fresh interpreter: mallopt is process-wide and cannot be undone.
_FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
from albef.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
n = 64 << 18  # 64 MB of float32: above glibc's largest default mmap threshold (32 MB)
faults = []
for _ in range(5):  # allocated, touched and freed, as a step's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


def _faults_of_a_reused_block(mode: str) -> tuple[str, int]:
    """The fewest pages faulted in by a reallocation of a freed 64 MB block (after the first)."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(_mallopt() is None, reason="needs glibc's mallopt")
def test_kept_memory_serves_the_next_step_without_faulting_pages_in():
    # a 64 MB block is 16,384 pages: by default glibc maps it afresh every time and the kernel faults
    # every page in again; with keep_freed_memory the freed block stays in the heap and is reused (a
    # small allocation placed in it meanwhile can make one reallocation grow the heap: the minimum)
    _, default = _faults_of_a_reused_block("default")
    applied, kept = _faults_of_a_reused_block("keep")
    if default < 8000:
        pytest.skip(f"only {default} faults by default: another allocator (LD_PRELOAD) serves malloc")
    assert applied == "True"
    assert kept < 1000, (default, kept)


def test_training_keeps_freed_memory_on_the_cpu_unless_checkpointing(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append(1) or True)
    assert heap.tune_for_training("auto", on_cpu=True, grad_checkpointing=False)
    assert not heap.tune_for_training("auto", on_cpu=True, grad_checkpointing=True)  # it trims instead
    assert not heap.tune_for_training("auto", on_cpu=False, grad_checkpointing=False)  # CUDA memory
    assert not heap.tune_for_training(False, on_cpu=True, grad_checkpointing=False)
    assert heap.tune_for_training(True, on_cpu=True, grad_checkpointing=True)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="train.keep_freed_memory must be true, false or auto"):
        heap.tune_for_training("yes", on_cpu=True, grad_checkpointing=False)
