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
