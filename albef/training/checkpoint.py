"""Crash-safe checkpoint files and RNG state capture.

Example:
    >>> from albef.training.checkpoint import (
    ...     CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
    >>> model = torch.nn.Linear(2, 2)
    >>> _ = save_checkpoint({"model": model.state_dict(), "step": 100, "rng": rng_state()}, f"run/{CHECKPOINT_NAME}")
    >>> ckpt = load_checkpoint(f"run/{CHECKPOINT_NAME}")
    >>> ckpt["step"]
    100
    >>> set_rng_state(ckpt["rng"])
"""

from __future__ import annotations

import os
import pickle
import random
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "find_last_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint_last.pt"
BEST_NAME = "checkpoint_best.pt"  # the epoch with the best validation metric

# What torch.load raises on a truncated or garbled file (a half-written zip can even surface as
# OSError(EINVAL) or KeyError from the zip reader). Permission / missing-file errors are excluded below.
_CORRUPT_ERRORS = (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, struct.error,
                   zipfile.BadZipFile, pickle.UnpicklingError)


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (truncated, corrupt, or unsafe to unpickle)."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically: a crash leaves the old file or the new one, never half of one.

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
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a multi-GB temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, never executing pickled code.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for a truncated,
    corrupt or unsafe one.

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
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(e)
        # "Unsupported global" is the weights_only allowlist refusing a class/function: the file is
        # intact but unsafe. Other unpickler failures (bad opcodes) mean garbage bytes.
        if reason and re.search(r"global|reduce|unrecognized function", reason, re.IGNORECASE):
            raise CheckpointError(
                f"{path}: contains Python objects beyond tensors and plain containers ({reason}); "
                "albef refuses to unpickle it for safety, since unpickling can run arbitrary code. Re-save it "
                "holding only tensors, numbers, strings, lists, tuples and dicts, or load it yourself with "
                "torch.load(weights_only=False) only if you trust where it came from"
            ) from e
        raise _corrupt(path, e, reason) from e
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except _CORRUPT_ERRORS as e:
        if isinstance(e, RuntimeError) and not _is_cpu(map_location) and _loads_on_cpu(path):
            raise  # the file is fine; the device in map_location is the problem (e.g. no CUDA here)
        raise _corrupt(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def _corrupt(path: Path, e: BaseException, reason: str | None = None) -> CheckpointError:
    reason = reason or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return CheckpointError(f"{path}: not a complete checkpoint (truncated or corrupt: {reason}); "
                           "use the previous checkpoint or re-run")


def _weights_only_reason(e: BaseException) -> str | None:
    # torch's message is a long how-to; keep only its one-line diagnosis ("Unsupported global: ...").
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return m.group(1).split(". Please")[0].strip() if m else None


def _is_cpu(map_location: Any) -> bool:
    return map_location is None or str(map_location) == "cpu"


def _loads_on_cpu(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def find_last_checkpoint(directory: str | Path) -> Path | None:
    """``directory/checkpoint_last.pt`` if it exists, else None. Temp files of killed writes are ignored.

    Example:
        >>> ckpt_path = find_last_checkpoint("run")  # None on a fresh run
    """
    path = Path(directory) / CHECKPOINT_NAME
    return path if path.is_file() else None


def rng_state() -> dict[str, Any]:
    """Every RNG that training draws from, as tensors / ints / floats / strings (loadable with weights_only).

    Example:
        >>> state = rng_state(); a = torch.rand(1); set_rng_state(state); assert torch.equal(a, torch.rand(1))
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's and python's states are tuples holding ndarrays / huge int tuples, which the
        # weights_only unpickler rejects; MT19937 words are < 2**32 so int64 tensors hold them exactly.
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        # this process's device only: touching every GPU would create a context on each from every rank
        state["cuda"] = [torch.cuda.get_rng_state()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs captured by :func:`rng_state` (missing entries are left untouched).

    Example:
        >>> _ = save_checkpoint({"rng": rng_state()}, "run/checkpoint_last.pt")
        >>> first = torch.rand(3)
        >>> set_rng_state(load_checkpoint("run/checkpoint_last.pt")["rng"])
        >>> torch.equal(torch.rand(3), first)
        True
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it to a GPU
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if state.get("cuda"):
        if not torch.cuda.is_available():
            warnings.warn("checkpoint has CUDA RNG states but CUDA is unavailable; not restoring them",
                          stacklevel=2)
            return
        # A resume on fewer/more GPUs restores the devices both runs have.
        torch.cuda.set_rng_state(state["cuda"][0].cpu())
