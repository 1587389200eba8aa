"""``train.compile``: the encoders under ``torch.compile`` (Inductor's C++ kernels on the CPU)
compute the eager fast model's pretraining step, in values and gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

from albef.models.albef import ALBEF
from albef.training.pretrain import ALBEFPretrainer

from conftest import text_batch

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")


def _step(cfg, compiled: bool):
    torch.manual_seed(0)
    trainer = ALBEFPretrainer(ALBEF(cfg)).double().train()
    if compiled:
        for m in trainer.encoders():  # what albef.training.build does for train.compile
            m.compile()
    ids, mask = text_batch(4, 12)
    out = trainer(
        torch.randn(4, 3, 32, 32, dtype=torch.float64),
        ids,
        mask,
        alpha=0.4,
        generator=torch.Generator().manual_seed(3),
        enqueue=False,
    )
    out.loss.backward()
    return out, {n: p.grad for n, p in trainer.named_parameters() if p.grad is not None}


def test_compiled_pretraining_step_equals_the_eager_one(tiny_config):
    torch._dynamo.reset()
    ref, ref_grads = _step(tiny_config, compiled=False)
    out, grads = _step(tiny_config, compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    for name in ("loss", "itc", "itm", "mlm"):
        a, b = getattr(out, name), getattr(ref, name)
        torch.testing.assert_close(a if name == "loss" else a.loss, b if name == "loss" else b.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.itm.logits, ref.itm.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.teacher.image_feat, ref.teacher.image_feat, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)
