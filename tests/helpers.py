"""Plain helpers shared by the tests (fixtures live in conftest.py).

Tests import it as ``from helpers import text_batch``: pytest puts ``tests/`` on ``sys.path`` for
its conftest.py and test files (rootdir-relative "prepend" imports, no ``__init__.py``), so this
works from CI's ``pytest`` and from ``pytest tests/test_x.py`` alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
import torch

#: the LAVIS reference vectors (``albef parity``'s input): ``../shared/parity`` beside the checkout,
#: or the folder ``ALBEF_PARITY_DIR`` names
PARITY_DIR = Path(os.environ.get("ALBEF_PARITY_DIR") or Path(__file__).resolve().parents[2] / "shared" / "parity")

#: set (to anything but "" or "0") where the reference vectors must be present, as in CI (.ci/run):
#: a test that needs them then fails instead of skipping
REQUIRE_PARITY_ENV = "ALBEF_REQUIRE_PARITY"


def parity_required() -> bool:
    return os.environ.get(REQUIRE_PARITY_ENV, "") not in ("", "0")


def missing_parity(path: Path) -> NoReturn:
    """Skip the calling test for want of the reference vectors at ``path``, or fail it where they
    are required."""
    msg = f"reference vectors not found at {path}"
    if parity_required():
        pytest.fail(
            f"{msg} ({REQUIRE_PARITY_ENV} is set: the parity tests must run; put the folder "
            "there or point ALBEF_PARITY_DIR at it)",
            pytrace=False,
        )
    pytest.skip(f"{msg} (set {REQUIRE_PARITY_ENV}=1 to make this a failure)")


def text_batch(B: int, L: int, vocab: int = 30522, generator: torch.Generator | None = None):
    """Random ids with [CLS] first and a ragged [PAD] tail, and their mask."""
    g = generator or torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (B, L), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return ids * mask, mask


def float64_pretraining_step(cfg, fast: bool = True, checkpointing: bool = False, compiled: bool = False):
    """One float64 pretraining step of a model built from seed 0 on a padded batch (4 texts of up
    to 12 tokens, 32 px images), its backward included: ``(output, {name: grad}, attention mask)``.
    ``compiled`` compiles the encoders as ``train.compile`` does (albef.training.build)."""
    from albef.models.albef import ALBEF
    from albef.training.pretrain import ALBEFPretrainer

    torch.manual_seed(0)
    trainer = ALBEFPretrainer(ALBEF(cfg, fast=fast)).double().train()
    trainer.model.set_grad_checkpointing(checkpointing)
    if compiled:
        for m in trainer.encoders():
            m.compile()
    ids, mask = text_batch(4, 12)
    assert (mask == 0).sum() > 10  # the batch really is padded
    out = trainer(
        torch.randn(4, 3, 32, 32, dtype=torch.float64),
        ids,
        mask,
        alpha=0.4,
        generator=torch.Generator().manual_seed(3),
        enqueue=False,
    )
    out.loss.backward()
    grads = {n: p.grad for n, p in trainer.named_parameters() if p.grad is not None}
    return out, grads, mask


def assert_same_step(out, ref, grads: dict, ref_grads: dict, *, rtol: float, grad_rtol: float) -> None:
    """Two :func:`float64_pretraining_step` results agree: every loss, the ITM and MLM logits
    (the teacher's too), both [CLS] text features, and every parameter's gradient."""
    for get in (
        lambda o: o.loss,
        lambda o: o.itc.loss,
        lambda o: o.itm.loss,
        lambda o: o.mlm.loss,
        lambda o: o.itm.logits,
        lambda o: o.mlm.logits,
        lambda o: o.mlm.logits_m,
        lambda o: o.student.text_feat,
        lambda o: o.teacher.text_feat,
    ):
        torch.testing.assert_close(get(out), get(ref), rtol=rtol, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=grad_rtol, atol=1e-12, msg=name)


def bare_recipe(folder: Path, task: str) -> str:
    """``--config`` for ``albef finetune TASK`` that keeps the library's defaults (the tests set
    what they need as overrides)."""
    path = Path(folder) / f"{task}_bare.yaml"
    path.write_text(f"task: {task}\n")
    return str(path)
