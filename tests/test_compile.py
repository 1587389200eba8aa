"""``train.compile``: the encoders under ``torch.compile`` (Inductor's C++ kernels on the CPU)
compute the eager fast model's pretraining step, in values and gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import float64_pretraining_step

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")


def test_compiled_pretraining_step_equals_the_eager_one(tiny_config):
    torch._dynamo.reset()
    ref, ref_grads, _ = float64_pretraining_step(tiny_config)
    out, grads, _ = float64_pretraining_step(tiny_config, compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    for get in (
        lambda o: o.loss,
        lambda o: o.itc.loss,
        lambda o: o.itm.loss,
        lambda o: o.mlm.loss,
        lambda o: o.itm.logits,
        lambda o: o.teacher.image_feat,
    ):
        torch.testing.assert_close(get(out), get(ref), rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)
