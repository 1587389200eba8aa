from __future__ import annotations

from pathlib import Path

import pytest
import torch

from albef.config import get_preset
from albef.models.albef import ALBEF

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    cfg = get_preset("albef-tiny")
    cfg.text.hidden_dropout = cfg.text.attention_dropout = 0.0
    return cfg


@pytest.fixture
def tiny_model(tiny_config):
    return ALBEF(tiny_config)


@pytest.fixture
def parity_dir():
    if not (PARITY_DIR / "config.json").exists():
        pytest.skip(f"reference vectors not found at {PARITY_DIR}")
    return PARITY_DIR


def text_batch(B: int, L: int, vocab: int = 30522, generator: torch.Generator | None = None):
    """Random ids with [CLS] first and a ragged [PAD] tail, and their mask."""
    g = generator or torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (B, L), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return ids * mask, mask
