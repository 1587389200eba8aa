"""Runs the usage examples in the package's docstrings (``--doctest-modules`` over ``albef``).

Each example runs in its own empty working directory, so an example may write ``run/...`` the way a
user would without touching the checkout or another example's files.
"""

from __future__ import annotations

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_in_empty_dir(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> None:
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(tmp_path)
