"""Where a command writes its results: checked before any work, and never replaced unless asked.

A scoring run can take hours; finding at its end that ``--out`` is a folder, or that it silently
replaced last week's numbers, loses work either way. Commands call these before they load a model.

Example:
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

from pathlib import Path

__all__ = ["earlier_outputs", "new_output_file"]


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
    """The files in ``folder`` that a command's earlier run wrote (names matching ``patterns``).
    Without ``overwrite`` any such file is refused (``FileExistsError``); with it they are
    returned, for the caller to delete just before it writes the new ones, so that the folder
    never mixes two runs' files. Files of other names are left alone."""
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
