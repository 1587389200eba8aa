from __future__ import annotations

import pytest
import torch

from albef.config import get_preset
from albef.models.albef import ALBEF

from helpers import PARITY_DIR, missing_parity


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whatever needs the reference vectors (the ``parity_dir`` fixture) is a ``parity`` test."""
    for item in items:
        if "parity_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.parity)


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


@pytest.fixture(scope="session")
def parity_dir():
    """The reference vectors' folder; without it the test skips, or fails under ALBEF_REQUIRE_PARITY."""
    if not (PARITY_DIR / "config.json").exists():
        missing_parity(PARITY_DIR)
    return PARITY_DIR
