"""A run's folder and what its checkpoints hold: what a run writes there and the refusal to
overwrite one; the unsharded model and optimizer state, the data geometry and the RNG state a
checkpoint carries, so that a resumed run computes what the uninterrupted one would have.

The checkpoint files themselves (atomic writes, checked reads) are :mod:`albef.checkpoints.files`.

Example:
    >>> from albef.checkpoints.files import load_checkpoint, save_checkpoint
    >>> _ = save_checkpoint({"step": 100, "rng": rng_state()}, f"run/{CHECKPOINT_NAME}")
    >>> set_rng_state(load_checkpoint(f"run/{CHECKPOINT_NAME}")["rng"])
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from albef.checkpoints.files import BEST_NAME, CHECKPOINT_NAME, PREVIOUS_NAME
from albef.seeding import SEED_RULE

__all__ = [
    "RUN_FILES",
    "RunExistsError",
    "check_geometry",
    "check_output_dir",
    "delete_run_files",
    "find_last_checkpoint",
    "full_train_state",
    "load_train_state",
    "rng_state",
    "run_geometry",
    "set_rng_state",
]


#: what a run writes into its folder; ``overwrite`` deletes these and nothing else
RUN_FILES = (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    BEST_NAME,
    "metrics.jsonl",
    "metrics.csv",
    "loss_curves.png",
    "bad_samples.txt",
    "tensorboard",
)


class RunExistsError(FileExistsError):
    """The output folder holds a run, and neither resuming nor starting over was asked for."""


def check_output_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse what would destroy a run: a fresh start into a folder holding one (without
    ``overwrite``), or ``resume`` from an explicit checkpoint that is not there."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start it over")
    if resume not in (False, True) and not Path(resume).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no such checkpoint file; give the path of a checkpoint "
            f"(e.g. {out / CHECKPOINT_NAME}), or --resume alone for the run in output_dir"
        )
    found = [name for name in RUN_FILES if (out / name).exists()]
    checkpoints = [name for name in found if name.endswith(".pt")]
    if checkpoints and resume not in (False, True) and not Path(resume).parent.samefile(out):
        raise RunExistsError(
            f"{out} holds a run ({', '.join(checkpoints)}) and --resume names another run's checkpoint "
            f"({resume}): continuing it here would replace this run's checkpoints. Continue this run "
            "with --resume alone, or resume the other in its own folder or an empty output_dir"
        )
    if found and not resume and not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(found)}). Add --resume to continue it, "
            f"--overwrite to start it over (its checkpoints and logs are deleted), or set "
            f"output_dir=ANOTHER_FOLDER"
        )


def delete_run_files(out: Path) -> None:
    """Delete what a run wrote into ``out`` (:data:`RUN_FILES`), nothing else."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


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
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available():
        # this process's device only: touching every GPU would create a context on each from every rank
        state["cuda"] = [torch.cuda.get_rng_state()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs captured by :func:`rng_state` (missing entries are left untouched).

    Example:
        >>> from albef.checkpoints.files import load_checkpoint, save_checkpoint
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
            warnings.warn("checkpoint has CUDA RNG states but CUDA is unavailable; not restoring them", stacklevel=2)
            return
        # A resume on fewer/more GPUs restores the devices both runs have.
        torch.cuda.set_rng_state(state["cuda"][0].cpu())


def full_train_state(trainer: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (the optimizer's keyed by parameter name), the
    same whether the run is sharded or not, so any number of ranks can resume from them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(trainer, options=opts),
        get_optimizer_state_dict(trainer.model, optimizer, options=opts),
    )


def load_train_state(trainer: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(trainer, ckpt["model"], options=opts)
    state = ckpt["optimizer"].get("state", {})
    if state and all(isinstance(k, int) for k in state):  # a checkpoint from before name-keyed states
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        set_optimizer_state_dict(trainer.model, optimizer, ckpt["optimizer"], options=opts)


def run_geometry(recipe: Any, global_batch: int, steps_per_epoch: int, world_size: int) -> dict[str, Any]:
    """What a checkpoint records of how the run deals its data and schedules its steps."""
    t, d = recipe.train, recipe.data
    geometry = {
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "max_steps": t.max_steps,
        "schedule": t.schedule,
        "seed_rule": SEED_RULE,
    }
    if d.shards:  # the shard streams are dealt per rank and loader worker
        geometry["stream_slots"] = [world_size, d.num_workers, t.batch_size]
    return geometry


def check_geometry(saved: dict | None, now: dict[str, Any], path: Path) -> list[str]:
    """The data order and the schedule depend on the global batch: resuming with another one
    would silently train on a different stream (a ValueError); ranks x batch x accumulation may
    change. Returns warnings: an older seed rule, a moved end of the cosine schedule."""
    warnings_ = []
    rule = (saved or {}).get("seed_rule", 1)  # checkpoints from before albef/seeding.py: 1
    if rule != SEED_RULE:
        warnings_.append(
            f"{path} was written by a version with seed rule {rule}, or before checkpoints recorded it (this "
            f"one: {SEED_RULE}): the run resumes, but from here on its sample order, augmentation and dropout "
            "are not what the uninterrupted run would have drawn (the rest of a half-done epoch may "
            "repeat some samples and skip others)"
        )
    if not saved:  # checkpoints from before this check
        return warnings_
    for key in ("global_batch", "steps_per_epoch", "stream_slots"):
        if saved.get(key) != now.get(key):
            raise ValueError(
                f"{path} was written with {key} {saved.get(key)}, this run has {now.get(key)}: "
                "keep batch_size x ranks x grad_accum (and the data; for shards also the ranks, "
                "data.num_workers and batch_size) as they were to resume"
            )
    if saved["max_steps"] != now["max_steps"] and now["schedule"] == "cosine":
        warnings_.append(
            f"train.max_steps changed from {saved['max_steps']} to {now['max_steps']}: the cosine schedule "
            f"now ends elsewhere than in the run that wrote {path}"
        )
    return warnings_
