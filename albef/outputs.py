"""Where a command writes its results: checked before any work, and never replaced unless asked.

A scoring run can take hours; finding at its end that ``--out`` is a folder, or that it silently
replaced last week's numbers, loses work either way. Commands call these before they load a model.
Data builders record the settings they build a folder with, so that a second build with other
settings cannot mix two sets in one folder (:func:`start_build`).

Example:
    >>> from pathlib import Path
    >>> from albef.outputs import new_output_file
    >>> new_output_file("scores/coco.json", "--out").name
    'coco.json'
    >>> _ = Path("scores/coco.json").write_text("{}")
    >>> new_output_file("scores/coco.json", "--out")
    Traceback (most recent call last):
    ...
    FileExistsError: --out scores/coco.json already exists: give another path, or --overwrite to replace it
"""

from __future__ import annotations

import json
from pathlib import Path

from albef.checkpoints.files import atomic_write_text

__all__ = ["BUILD_RECORD", "check_build", "earlier_outputs", "finish_build", "new_output_file", "start_build"]

#: the file in which a data builder records what it builds (:func:`start_build`)
BUILD_RECORD = "build.json"


def new_output_file(path: str | Path, flag: str, overwrite: bool = False) -> Path:
    """``path`` as a file a command may write: not a folder, not an existing file unless
    ``overwrite``; its folder is made now. Raises ``IsADirectoryError`` / ``FileExistsError``
    naming ``flag`` and the fix."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists: give another path, or --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def earlier_outputs(folder: str | Path, patterns: tuple[str, ...], flag: str, overwrite: bool = False) -> list[Path]:
    """The files in ``folder`` that a command's earlier run wrote (names matching ``patterns``,
    relative to ``folder``). Without ``overwrite`` any such file is refused (``FileExistsError``);
    with it they are returned, for the caller to delete just before it writes the new ones, so
    that the folder never mixes two runs' files. Files of other names are left alone.

    >>> _ = Path("ov").mkdir(), Path("ov/grounding_000_ok.png").write_bytes(b""), Path("ov/mine.txt").touch()
    >>> earlier_outputs("ov", ("grounding_*.png",), "--overlays", overwrite=True)
    [PosixPath('ov/grounding_000_ok.png')]
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder} is a file; give a folder")
    found = sorted({f for pattern in patterns for f in folder.glob(pattern) if f.is_file()}) if folder.is_dir() else []
    if found and not overwrite:
        raise FileExistsError(
            f"{flag} {folder} already holds {len(found)} file(s) of an earlier run ({found[0].name}, ...): "
            "give another folder, or --overwrite to replace them"
        )
    return found


def check_build(folder: str | Path, settings: dict, overwrite: bool = False) -> None:
    """Refuse to build ``settings`` into ``folder`` where it holds data built with other settings
    (``FileExistsError`` naming them), unless ``overwrite``; data of another kind is refused even
    so. :func:`start_build` checks this too; a builder that downloads calls it first on its own, so
    that a refusal comes before the download and the old set is cleared only after it."""
    settings = json.loads(json.dumps(settings))  # as it will read back
    there = _recorded(Path(folder))
    if there is None or there == settings:
        return
    if there.get("kind") != settings.get("kind"):
        raise FileExistsError(
            f"{folder} holds {there.get('kind')} data; {settings.get('kind')} data needs a folder of its own"
        )
    if not overwrite:
        diff = ", ".join(
            f"{k}: {there.get(k)} there, {settings.get(k)} here"
            for k in sorted({*there, *settings})
            if there.get(k) != settings.get(k)
        )
        raise FileExistsError(
            f"{folder} holds {there.get('kind')} data built with other settings ({diff}): give another folder, "
            f"or replace it (albef data {there.get('kind')} ... --overwrite; overwrite=True from Python)"
        )


def start_build(folder: str | Path, settings: dict, patterns: tuple[str, ...], overwrite: bool = False) -> None:
    """Before a data builder writes into ``folder``: data there built with the same ``settings``
    is built again in place (the builders are deterministic, so a build that stopped halfway goes
    on); data built with other settings is refused (:func:`check_build`) unless ``overwrite``, and
    then its files (``patterns``, relative to ``folder``) are deleted first, so that nothing of it
    outlives it; data of another kind is refused even so. The settings are recorded now
    (:data:`BUILD_RECORD`): a build cut short leaves its own settings behind, never those of the
    set it replaced. :func:`finish_build` marks the record complete (for a reader of the folder;
    the check does not need it). A folder without a record is built in place, and with
    ``overwrite`` its files of ``patterns`` are deleted first.

    >>> start_build("set", {"kind": "shapes", "n": 8}, ("*.json",))
    >>> _ = Path("set/pretrain.json").write_text("[]")
    >>> start_build("set", {"kind": "shapes", "n": 8}, ("*.json",))  # the same set: built again
    >>> start_build("set", {"kind": "shapes", "n": 4}, ("*.json",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: set holds shapes data built with other settings (n: 8 there, 4 here): give another ...
    """
    folder = Path(folder)
    settings = json.loads(json.dumps(settings))  # as it will read back
    check_build(folder, settings, overwrite)
    if overwrite and _recorded(folder) != settings:
        for earlier in earlier_outputs(folder, patterns, str(folder), overwrite=True):
            earlier.unlink()
    _record(folder, settings, complete=False)


def finish_build(folder: str | Path, settings: dict) -> None:
    """Mark the build :func:`start_build` recorded in ``folder`` complete."""
    _record(Path(folder), json.loads(json.dumps(settings)), complete=True)


def _recorded(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    settings = record.get("settings") if isinstance(record, dict) else None
    return settings if isinstance(settings, dict) and "kind" in settings else None  # malformed: no record


def _record(folder: Path, settings: dict, complete: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / BUILD_RECORD, json.dumps({"settings": settings, "complete": complete}, indent=1))
