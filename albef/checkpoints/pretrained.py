"""The project's own model folder: ``config.json`` + ``model.safetensors`` + tokenizer files.

Example:
    >>> from albef import ALBEF, get_preset
    >>> model = ALBEF(get_preset("albef-tiny"))
    >>> save_pretrained(model, "/tmp/albef-tiny")                 # doctest: +SKIP
    >>> same = from_pretrained("/tmp/albef-tiny")                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from albef.checkpoints.files import BEST_NAME, CHECKPOINT_NAME, atomic_write_text, load_checkpoint
from albef.config import ALBEFConfig
from albef.data.annotations import read_json_file
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA, task_model
from albef.text import Tokenizer

FORMAT = "albef-model/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _describe(model: torch.nn.Module) -> dict:
    if isinstance(model, ALBEF):
        return {"task": "albef", "mlm_head": model.mlm_head is not None}
    if isinstance(model, ALBEFForVQA):
        return {"task": "vqa", "decoder_layers": model.text_decoder.cfg.num_layers}
    if isinstance(model, ALBEFForClassification):
        return {
            "task": "classification",
            "num_classes": model.cls_head[-1].out_features,
            "num_images": model.num_images,
        }
    raise TypeError(f"cannot save a {type(model).__name__}: not an albef model")


def _build(meta: dict, where: Path | str = CONFIG) -> torch.nn.Module:
    """The model a folder's ``config.json`` (``meta``, read from ``where``) describes."""
    task = meta.get("task", "albef")
    need = {"albef": ("mlm_head",), "vqa": ("decoder_layers",), "classification": ("num_classes", "num_images")}
    if task not in need:
        raise ValueError(f"{where}: unknown model task {task!r}")
    missing = [k for k in ("config", *need[task]) if k not in meta]
    if missing or not isinstance(meta["config"], dict):  # a config.json cut down or edited by hand
        what = f"no {missing[0]!r} entry" if missing else "'config' is not an object"
        raise ValueError(f"{where}: {what}; the folder is damaged: write it again")
    cfg = ALBEFConfig.from_dict(meta["config"])
    if task == "albef":
        return ALBEF(cfg, mlm_head=meta["mlm_head"])
    if task == "vqa":
        return ALBEFForVQA(cfg, meta["decoder_layers"])
    return ALBEFForClassification(cfg, meta["num_classes"], meta["num_images"])


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write an inference model (no momentum copy, no queues) and its tokenizer to ``directory``.

    Works for :class:`ALBEF` and the task models (VQA, SNLI-VE, NLVR2).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **_describe(model), "config": model.config.to_dict()}
    # clone: NLVR2's shared cross-attention tensors appear under two names (safetensors wants
    # distinct storage); loading ties them again by construction
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    # atomic: a kill mid-write never leaves a half-written weights file under the final name
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT})
        os.replace(tmp, d / WEIGHTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(d / CONFIG, json.dumps(meta, indent=2) + "\n")
    (tokenizer or Tokenizer(add_sep=model.config.add_sep)).save(d)
    return d


def from_pretrained(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    expect: type | None = None,
) -> torch.nn.Module:
    """Load a folder written by :func:`save_pretrained`, strictly (the right model class).

    ``expect``: the class the caller needs; another model in the folder is a clear error.
    """
    d = Path(directory)
    cfg_path = d / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} not found: {d} is not an albef model folder "
            "(convert an authors' checkpoint with `albef convert SRC DST`)"
        )
    try:
        meta = read_json_file(cfg_path)
    except ValueError as e:
        raise ValueError(f"{e}; the folder is damaged: write it again") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{cfg_path}: format {fmt!r}, expected {FORMAT!r}")
    model = _build(meta, cfg_path)
    if expect is not None and not isinstance(model, expect):
        raise ValueError(f"{d} holds a {type(model).__name__} ({meta.get('task')} model), not a {expect.__name__}")
    try:
        state = load_file(str(d / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{d / WEIGHTS}: cannot be read ({e}); the folder is incomplete or corrupt") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{d / WEIGHTS} does not fit the model its {CONFIG} describes ({str(e).splitlines()[0]}); "
            "the folder's two files are not from one save: write it again"
        ) from None
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


# -- any model path: a model folder, a run's checkpoint, a run folder ---------------------------

MODEL_PATHS = (
    "an albef model folder, a run's checkpoint (.pt), or a run folder: its checkpoint_best.pt "
    "(best validation epoch), else checkpoint_last.pt"
)


class NotAModelError(ValueError):
    """A weights file albef cannot build a model from by itself (no stored model config)."""


def resolve_model_path(path: str | Path) -> Path:
    """A run folder (it holds training checkpoints) becomes its best checkpoint, the epoch with the
    best validation metric, or its last when the run had no validation; anything else is kept."""

    path = Path(path)
    if path.is_dir() and not (path / CONFIG).exists():
        for name in (BEST_NAME, CHECKPOINT_NAME):
            if (path / name).is_file():
                return path / name
    return path


def peek_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents without reading its tensors (memory-mapped), to tell what it is;
    files that cannot be mapped are read whole by :func:`load_checkpoint` (its clear errors)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) or broken file: the full loader says which
        return load_checkpoint(path)
    if not isinstance(obj, dict):
        return load_checkpoint(path)  # its "expected a dict checkpoint" error
    return obj


def is_training_checkpoint(obj: object) -> bool:
    """A checkpoint of an albef training run: the trainer's state with its model config and recipe."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_config" in obj and "recipe" in obj


def describe_weights(obj: object) -> str:
    """What a file that is not a training checkpoint holds, in words (for error messages)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return (
            "an authors' checkpoint ({'model': state_dict, ...}) without albef's stored model config"
            if "model_config" not in obj
            else "a checkpoint with a model config but no training recipe"
        )
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = [str(k) for k in obj]
        if any(k.startswith(("model.", "model_m.", "queue.")) for k in keys):
            return "a bare state dict of an albef trainer (tensors only, no model config)"
        if any(
            ".bert." in k or "_m." in k or k in ("image_queue", "text_queue") or k.startswith("module.") for k in keys
        ):
            return "an authors' checkpoint (a bare state dict in their key layout, no model config)"
        return "a bare state dict (tensors only, e.g. torch.save(model.state_dict()); no model config)"
    return "not a checkpoint albef knows (no 'model_config' and 'recipe' of a training run)"


def not_a_model_error(path: str | Path, what: str) -> NotAModelError:
    return NotAModelError(
        f"{path} is {what}, not an albef model folder or training checkpoint, so albef cannot tell which "
        f"model it holds. Convert it first, naming the preset it was built with: "
        f"`albef convert {path} DIR --preset albef-base` (or albef-small / albef-tiny), then pass DIR"
    )


def student_of(ckpt: dict, source: str | Path = "checkpoint") -> torch.nn.Module:
    """The student of a training checkpoint: the model its recipe's task trains, built from its
    stored config and loaded strictly from its ``model.*`` tensors (teacher and queues are left)."""
    task = ckpt["recipe"].get("task", "pretrain")
    model = task_model(task, ALBEFConfig.from_dict(ckpt["model_config"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["model"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: its model tensors do not fit a {task} model of its own config ({e})") from e
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, expect: type | None = None
) -> torch.nn.Module:
    """An inference model (eval mode) from an albef model folder, a training run's checkpoint (its
    student, built from the config stored in the checkpoint) or a run folder (its
    ``checkpoint_best.pt``, else ``checkpoint_last.pt``).

    A bare state dict or an authors' checkpoint holds no model config: :class:`NotAModelError`
    names the file and the ``albef convert`` that makes a model folder of it.
    """
    path = resolve_model_path(path)
    if path.is_dir():
        if not (path / CONFIG).exists():
            raise FileNotFoundError(
                f"{path} is neither an albef model folder (no {CONFIG}) nor a run folder "
                "(no checkpoint_best.pt / checkpoint_last.pt)"
            )
        return from_pretrained(path, device, dtype, expect)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {MODEL_PATHS}")
    if path.suffix == ".safetensors":
        raise not_a_model_error(path, "a bare state dict (a .safetensors file without albef's config.json)")
    obj = peek_checkpoint(path)
    if not is_training_checkpoint(obj):
        raise not_a_model_error(path, describe_weights(obj))
    del obj
    model = student_of(load_checkpoint(path), path)
    if expect is not None and not isinstance(model, expect):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a {expect.__name__}")
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


def load_inference_model(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """:func:`load_model` for the commands: an albef model folder, a training run's checkpoint (its
    student), or a run folder (its ``checkpoint_best.pt``, else ``checkpoint_last.pt``); a
    checkpoint's path goes to stderr, so a run's output says which epoch it scored."""
    path = resolve_model_path(path)
    if path.suffix == ".pt":
        print(f"model: {path}", file=sys.stderr)
    return load_model(path, device)
