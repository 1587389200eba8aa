"""``train.compile``: the encoders under ``torch.compile`` (Inductor's C++ kernels on the CPU)
compute the eager fast model's pretraining step, in values and gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import assert_same_step, float64_pretraining_step

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")


@pytest.mark.slow
def test_compiled_pretraining_step_equals_the_eager_one(tiny_config):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, ref_grads, _ = float64_pretraining_step(tiny_config)
    out, grads, _ = float64_pretraining_step(tiny_config, compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    assert_same_step(out, ref, grads, ref_grads, rtol=1e-10, grad_rtol=1e-8)
