"""Reading the authors' JSON annotation files, skipping and counting malformed entries.

A file is either a JSON list (the authors' format) or JSON Lines (one object per line). A
whole file that cannot be parsed is an error naming the file; a single bad entry (not an
object, a missing field, an empty caption after cleaning, an unparsable JSON line) is skipped
and reported as a :class:`BadSample` naming the file and the entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BadSample:
    """One skipped sample: where it is and why it was skipped."""

    where: str  # "file.json[12]" or an image path
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class BadDataError(RuntimeError):
    """Too many bad samples: the data, not the run, needs fixing."""


def _entries(path: Path) -> Iterable[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON list of entries "
                             "or one JSON object per line") from e
        for i, entry in enumerate(data):
            yield f"{path}[{i}]", entry
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", BadSample(f"{path}:{lineno}", f"unreadable JSON line ({e.msg})")


def read_annotations(files: str | Path | Iterable[str | Path], parse: Callable[[dict, str], Any]
                     ) -> tuple[list[Any], list[BadSample]]:
    """Parse every entry of every file with ``parse(entry, where)``.

    ``parse`` returns a record or raises ``ValueError`` with a reason, which skips the entry.

    Example:
        >>> records, bad = read_annotations(["coco.json"], parse_pretrain_entry(image_root="/data"))  # doctest: +SKIP
    """
    if isinstance(files, (str, Path)):
        files = [files]
    records, bad = [], []
    for f in files:
        path = Path(f)
        if not path.exists():
            raise FileNotFoundError(f"annotation file {path} not found")
        for where, entry in _entries(path):
            if isinstance(entry, BadSample):
                bad.append(entry)
                continue
            if not isinstance(entry, dict):
                bad.append(BadSample(where, f"entry is a {type(entry).__name__}, not an object"))
                continue
            try:
                records.append(parse(entry, where))
            except ValueError as e:
                bad.append(BadSample(where, str(e)))
    return records, bad


def resolve_image(image: Any, image_root: str | Path | None) -> str:
    if not isinstance(image, str) or not image:
        raise ValueError("missing or empty 'image' field")
    path = Path(image)
    if image_root is not None and not path.is_absolute():
        path = Path(image_root) / path
    return str(path)


def check_bad_share(n_bad: int, n_seen: int, max_fraction: float, examples: list[BadSample],
                    what: str = "samples") -> None:
    """Raise :class:`BadDataError` naming the files when the bad share passes the limit."""
    if n_seen and n_bad / n_seen > max_fraction:
        names = "\n  ".join(str(b) for b in examples[:20])
        more = f"\n  ... and {n_bad - 20} more" if n_bad > 20 else ""
        raise BadDataError(
            f"{n_bad} of {n_seen} {what} were bad ({n_bad / n_seen:.1%}), more than the limit "
            f"max_bad_fraction={max_fraction:.1%}. Fix or remove them, or raise the limit:\n  {names}{more}")
