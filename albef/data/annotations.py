"""Reading the authors' JSON annotation files, skipping and counting malformed entries.

A file is either a JSON list (the authors' format) or JSON Lines (one object per line), UTF-8
with or without a byte-order mark. A whole file that cannot be parsed (not UTF-8 or not valid
JSON for a list, a top-level object) is an error naming the file; a single bad entry (not an
object, a missing field, text the tokenizer cannot take or that is empty after cleaning, an
undecodable or unparsable JSON line) is skipped and reported as a :class:`BadSample` naming the
file and the entry. Files where every entry is bad are an error listing them.
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


_BOM = b"\xef\xbb\xbf"


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError, base: int = 0) -> str:
    at = base + e.start
    return (
        f"not UTF-8 text: byte {at} ({data[e.start : e.start + 4]!r}) cannot be decoded; annotation files "
        f"must be UTF-8: re-encode {path.name} (e.g. iconv -f latin1 -t utf-8)"
    )


def read_json_file(path: str | Path) -> Any:
    """One JSON document, decoded as UTF-8 (a byte-order mark is accepted); an error naming the
    file, and the byte offset where it is not UTF-8, when it cannot be read."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {_not_utf8(path, data, e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _top_level_object(path: Path, obj: dict) -> ValueError:
    keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    hint = (
        f"its {lists[0]!r} holds a list of {len(obj[lists[0]])} objects: write that list as the file"
        if lists
        else "if it is one entry, wrap it in [ ] (or write it on one line, JSON Lines)"
    )
    return ValueError(
        f"{path}: expected a JSON list of entries or JSON Lines (one entry per line), found a "
        f"JSON object with keys {keys}; {hint}"
    )


def _entries(path: Path) -> Iterable[tuple[str, Any]]:
    data = path.read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0  # utf-8-sig: a byte-order mark is accepted
    data = data[bom:]
    stripped = data.lstrip()
    if stripped.startswith((b"[", b"{")):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if stripped.startswith(b"["):  # a JSON list cannot be read in part
                raise ValueError(f"{path}: {_not_utf8(path, data, e, bom)}") from None
            text = None  # JSON Lines: the undecodable lines are skipped below
        if stripped.startswith(b"["):
            try:
                entries = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: not valid JSON ({e}); expected a JSON list of entries or one JSON object per line"
                ) from e
            for i, entry in enumerate(entries):
                yield f"{path}[{i}]", entry
            return
        if text is not None:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None  # several lines of objects: JSON Lines
            # one object spread over lines, or one wrapping the entries ({"annotations": [...]}), is
            # not JSON Lines; a single one-line entry is
            if isinstance(whole, dict) and (
                len(text.strip().splitlines()) > 1
                or any(isinstance(v, list) and v and all(isinstance(x, dict) for x in v) for v in whole.values())
            ):
                raise _top_level_object(path, whole)
    offset = bom  # byte offset of each line in the file
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        start, offset = offset, offset + len(raw) + 1
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, BadSample(where, _not_utf8(path, raw, e, start))
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadSample(where, f"unreadable JSON line ({e.msg})")


def read_annotations(
    files: str | Path | Iterable[str | Path], parse: Callable[[dict, str], Any]
) -> tuple[list[Any], list[BadSample]]:
    """Parse every entry of every file with ``parse(entry, where)``.

    ``parse`` returns a record or raises ``ValueError`` with a reason, which skips the entry.

    Example:
        >>> records, bad = read_annotations(["coco.json"], parse_pretrain_entry(image_root="/data"))  # doctest: +SKIP
    """
    files = [files] if isinstance(files, (str, Path)) else list(files)
    records, bad = [], []
    for f in files:
        path = Path(f)
        if not path.is_file():
            what = "is a folder: name the JSON files in it" if path.is_dir() else "not found"
            raise FileNotFoundError(f"annotation file {path} {what}")
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
    if bad and not records:  # said here, with the reasons, rather than as "the dataset is empty" later
        raise ValueError(
            f"no valid entry in {file_names(files)}: all {len(bad)} are bad; fix them:\n  "
            + "\n  ".join(map(str, bad[:20]))
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        )
    return records, bad


def file_names(files: str | Path | Iterable[str | Path]) -> str:
    files = [files] if isinstance(files, (str, Path)) else list(files)
    return ", ".join(str(f) for f in files)


def require_entries(n: int, files: str | Path | Iterable[str | Path], what: str = "evaluation") -> None:
    """An error naming the files when they hold no entry: there is nothing to evaluate."""
    if n == 0:
        raise ValueError(
            f"{file_names(files)}: no entries, nothing to evaluate; the {what} data must be a "
            "JSON list (or JSON Lines) of entries, and this one is empty"
        )


def resolve_image(image: Any, image_root: str | Path | None) -> str:
    if not isinstance(image, str) or not image:
        raise ValueError("missing or empty 'image' field")
    path = Path(image)
    if image_root is not None and not path.is_absolute():
        path = Path(image_root) / path
    return str(path)


def check_bad_share(
    n_bad: int, n_seen: int, max_fraction: float, examples: list[BadSample], what: str = "samples"
) -> None:
    """Raise :class:`BadDataError` naming the files when the bad share passes the limit."""
    if n_seen and n_bad / n_seen > max_fraction:
        names = "\n  ".join(str(b) for b in examples[:20])
        more = f"\n  ... and {n_bad - 20} more" if n_bad > 20 else ""
        raise BadDataError(
            f"{n_bad} of {n_seen} {what} were bad ({n_bad / n_seen:.1%}), more than the limit "
            f"max_bad_fraction={max_fraction:.1%}. Fix or remove them, or raise the limit:\n  {names}{more}"
        )
