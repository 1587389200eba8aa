"""Where a command writes its results: checked before any work, and never replaced unless asked.

A scoring run can take hours; finding at its end that ``--out`` is a folder, or that it silently
replaced last week's numbers, loses work either way. Commands call these before they load a model.

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

__all__ = ["BUILD_RECORD", "earlier_outputs", "new_output_file", "other_build", "record_build"]

#: the file in which a data builder records what it built (:func:`record_build`)
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


def record_build(folder: str | Path, settings: dict) -> None:
    """Record in ``folder`` the settings a data builder built it with (:data:`BUILD_RECORD`),
    for :func:`other_build` to compare a later build against."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(folder) / BUILD_RECORD, json.dumps(settings, indent=1, sort_keys=True))


def other_build(
    folder: str | Path, settings: dict, patterns: tuple[str, ...], flag: str, overwrite: bool = False
) -> list[Path]:
    """A data builder's check before it writes into ``folder``: the files of an earlier build
    (``patterns``) made with other ``settings`` (or with none recorded) are refused
    (``FileExistsError`` naming the settings that differ) unless ``overwrite``, and then returned
    for the caller to delete. A build with the same settings is not refused and returns nothing:
    the builders are deterministic, so it rewrites what is there (a fetch that stopped halfway
    goes on).

    >>> record_build("set", {"kind": "shapes", "n": 8})
    >>> _ = Path("set/pretrain.json").write_text("[]")
    >>> other_build("set", {"kind": "shapes", "n": 8}, ("pretrain.json",), "DIR")
    []
    >>> other_build("set", {"kind": "shapes", "n": 4}, ("pretrain.json",), "DIR")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: DIR set holds a set built with other settings (n: 8 there, 4 here): give another ...
    """
    found = earlier_outputs(folder, patterns, flag, overwrite=True)
    if not found:
        return []
    try:
        there = json.loads((Path(folder) / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        there = None
    if there == settings:
        return []
    if not overwrite:
        if isinstance(there, dict):
            keys = sorted({*there, *settings}, key=str)
            diff = ", ".join(
                f"{k}: {there.get(k)} there, {settings.get(k)} here" for k in keys if there.get(k) != settings.get(k)
            )
        else:
            diff = f"no {BUILD_RECORD} there, {found[0].name} is"
        raise FileExistsError(
            f"{flag} {folder} holds a set built with other settings ({diff}): give another folder, "
            "or --overwrite to replace it"
        )
    return found
