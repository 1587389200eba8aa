"""Crash-safe checkpoint files: written atomically (a kill never leaves a half-written file
under the final name), read with ``weights_only=True`` and checked (truncated, corrupt, unsafe
to unpickle, non-finite: a :class:`CheckpointError` that names the file).

Example:
    >>> from albef.checkpoints.files import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
    >>> model = torch.nn.Linear(2, 2)
    >>> _ = save_checkpoint({"model": model.state_dict(), "step": 100}, f"run/{CHECKPOINT_NAME}")
    >>> load_checkpoint(f"run/{CHECKPOINT_NAME}")["step"]
    100
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "CheckpointError",
    "check_finite",
    "clean_stale_temp_files",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint_last.pt"
PREVIOUS_NAME = "checkpoint_prev.pt"  # the last one's predecessor: --resume falls back to it
BEST_NAME = "checkpoint_best.pt"  # the epoch with the best validation metric

# What torch.load raises on a truncated or garbled file (a half-written zip can even surface as
# OSError(EINVAL) or KeyError from the zip reader). Permission / missing-file errors are excluded below.
_CORRUPT_ERRORS = (
    RuntimeError,
    EOFError,
    OSError,
    KeyError,
    ValueError,
    IndexError,
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (truncated, corrupt, or unsafe to unpickle)."""


def save_checkpoint(obj: dict[str, Any], path: str | Path, previous: str | Path | None = None) -> Path:
    """Write ``obj`` to ``path`` atomically: a crash leaves the old file or the new one, never half of one.

    ``previous``: where the file ``path`` held so far is kept (a hard link where the filesystem
    has them, so ``path`` is never absent). Every record of the file carries a CRC-32 that
    :func:`load_checkpoint` verifies.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> save_checkpoint({"step": 3, "model": model.state_dict()}, "run/checkpoint_last.pt")
        PosixPath('run/checkpoint_last.pt')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so os.replace is a rename within one filesystem (atomic on POSIX);
    # the leading dot keeps it out of globs like "*.pt".
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            # Without fsync the rename can reach disk before the data, so a power loss would leave
            # a complete-looking but empty file under the real name.
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            _keep(path, Path(previous))
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a multi-GB temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _keep(path: Path, previous: Path) -> None:
    link = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)  # path stays in place until the new file replaces it
        os.replace(link, previous)
    except OSError:  # no hard links here: for a moment only `previous` holds the state
        os.replace(path, previous)


def clean_stale_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temp files (``.NAME.tmp-PID``) that writes killed mid-way left in ``directory``,
    skipping those of processes still alive; returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (someone else's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    # Persists the rename itself. Some filesystems (and non-POSIX platforms) refuse to fsync a
    # directory; by then the data is already safe under its final name, so that is not an error.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", allow_nonfinite: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, never executing pickled code.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for a truncated,
    corrupt (a record whose CRC-32 does not match: a flipped bit) or unsafe one, and for model
    weights that are NaN or infinite (``allow_nonfinite=True`` loads them anyway, e.g. to debug).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = save_checkpoint({"model": model.state_dict()}, "run/checkpoint_last.pt")
        >>> ckpt = load_checkpoint("run/checkpoint_last.pt")
        >>> model.load_state_dict(ckpt["model"])
        <All keys matched successfully>
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}; check the path (resume expects {CHECKPOINT_NAME})")
    _verify_crc(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if str(e).startswith("Weights only load failed") and _is_pickle(path):
            # torch's safe unpickler refused a class, a function or an opcode: the file is readable
            # (its CRCs matched) but holds more than tensors and plain containers
            raise CheckpointError(
                f"{path}: refused for safety: it holds pickled Python objects or code beyond tensors and plain "
                f"containers ({_weights_only_reason(e)}), and unpickling those can run arbitrary code. albef "
                "loads only tensors, numbers, strings, lists, tuples and dicts; re-save the weights that way "
                "(e.g. torch.save(model.state_dict(), ...) or safetensors)"
            ) from e
        raise _corrupt(path, e) from e
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except _CORRUPT_ERRORS as e:
        if isinstance(e, RuntimeError) and not _is_cpu(map_location) and _loads_on_cpu(path):
            raise  # the file is fine; the device in map_location is the problem (e.g. no CUDA here)
        raise _corrupt(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if not allow_nonfinite:
        check_finite(obj.get("model", obj), str(path))
    return obj


def check_finite(state_dict: Any, source: str) -> None:
    """:class:`CheckpointError` naming the floating-point tensors of ``state_dict`` that hold NaN
    or infinity (a diverged run, or a damaged file); nothing else is checked."""
    if not isinstance(state_dict, dict):
        return
    bad = [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        names = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{source}: NaN or infinite values in {names}: the run that wrote it diverged or the "
            "file is damaged; use an earlier checkpoint (checkpoint_prev.pt keeps the one before)"
        )


def _is_pickle(path: Path) -> bool:
    """Whether the file's pickle stream (the ``*.pkl`` record of a zip checkpoint, else the whole
    file) parses as pickle opcodes; parsing executes nothing. Garbage bytes do not parse."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(".pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return False
    return True


def _verify_crc(path: Path) -> None:
    """A zip-format checkpoint (torch.save's) stores a CRC-32 per record; torch.load does not check
    them, so a flipped bit would load as a silently wrong weight."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        return  # not a zip (the authors' legacy .pth); torch.load judges it
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise _corrupt(path, e) from e
    if bad is not None:
        raise _corrupt(path, ValueError(f"record {bad} fails its CRC-32 check (changed bytes)"))


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    prev = path.with_name(PREVIOUS_NAME) if path.name == CHECKPOINT_NAME else None
    fix = (
        f"use {prev} (the checkpoint before it; --resume falls back to it)"
        if prev is not None and prev.exists()
        else "use an earlier checkpoint, or start again"
    )
    return CheckpointError(f"{path}: not a complete checkpoint (truncated or corrupt: {reason}); {fix}")


def _weights_only_reason(e: BaseException) -> str:
    """torch's one-line diagnosis ("Unsupported global: GLOBAL posix.system ...") without its
    advice, which this project never passes on (turning the protection off)."""
    for line in str(e).splitlines():
        m = re.search(
            r"(Unsupported global:.*|Trying to load unsupported.*|Unsupported operand.*|"
            r"Unsupported class.*|unrecognized function.*)",
            line,
            re.IGNORECASE,
        )
        if m:
            return m.group(1).split(". Please")[0].split(" was not an allowed global")[0].strip().rstrip(".")
    return "an object the safe loader does not allow"


def _is_cpu(map_location: Any) -> bool:
    return map_location is None or str(map_location) == "cpu"


def _loads_on_cpu(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill never leaves half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes: a file whose presence means "done" is whole or absent."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no temp file
