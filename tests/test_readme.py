"""The Python examples of the README and of docs/ run as written; the docs' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _run_examples(path: Path) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python example"
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(block, str(path), "exec"), namespace)
    return namespace


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write small files
    namespace = _run_examples(README)
    assert namespace["p_match"].shape == (2,) and namespace["sims"].shape == (4, 2)
    assert len(namespace["hits"]) == 2 and namespace["cam"].best_box in (0, 1)


def test_library_page_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run_examples(ROOT / "docs" / "library.md")
    assert namespace["p_match"].shape == (2,) and namespace["sims"].shape == (4, 2)
    assert namespace["itm"].shape == (2,)
    assert namespace["out"].loss.requires_grad
    assert namespace["answer"].answer in ("yes", "no", "red", "circle")
    assert not namespace["model"].training


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    """Every relative link or image of the README and the docs names a file that exists."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    missing = [
        t
        for t in targets
        if not re.match(r"[a-z]+:", t) and not t.startswith("#") and not (page.parent / t.split("#")[0]).exists()
    ]
    assert not missing, f"{page.name}: links to missing files {missing}"
