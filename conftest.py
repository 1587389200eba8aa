"""Runs the usage examples in the package's docstrings (``--doctest-modules`` over ``albef``).

Each example runs in its own empty working directory, so an example may write ``run/...`` the way a
user would without touching the checkout or another example's files.
"""

from __future__ import annotations

import importlib.util

import pytest

# this file and the bench scripts are not doctest modules; the web app's module needs the `serve`
# extra (its tests skip themselves without it, so collection must not fail on it either)
collect_ignore = ["conftest.py", "bench"]
if importlib.util.find_spec("fastapi") is None:
    collect_ignore.append("albef/serve/app.py")


@pytest.fixture(autouse=True)
def _doctest_in_empty_dir(request: pytest.FixtureRequest) -> None:
    if type(request.node).__name__ == "DoctestItem":  # only examples: ordinary tests keep their cwd
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
