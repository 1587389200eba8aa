"""Regenerated tables inside hand-written Markdown: only the block between two markers changes.

    >>> write_block(Path("bench/RESULTS.md"), "compare-cpu", table_text)  # doctest: +SKIP

writes ``<!-- compare-cpu:start -->``, the text and ``<!-- compare-cpu:end -->`` in place of the
old block, so the prose around it survives a re-run; a file without the block gets it appended
(``at="end"``) or put first (``at="start"``). Written atomically.
"""

from __future__ import annotations

from pathlib import Path

from albef.checkpoints.files import atomic_write_text


def write_block(path: Path, name: str, text: str, at: str = "end") -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip(chr(10))}\n{end}"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    elif at == "start":
        new = block + "\n" + ("\n" + old if old else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, new if new.endswith("\n") else new + "\n")
