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
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from albef.config import ALBEFConfig
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA
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
        return {"task": "classification", "num_classes": model.cls_head[-1].out_features,
                "num_images": model.num_images}
    raise TypeError(f"cannot save a {type(model).__name__}: not an albef model")


def _build(meta: dict) -> torch.nn.Module:
    cfg = ALBEFConfig.from_dict(meta["config"])
    task = meta.get("task", "albef")
    if task == "albef":
        return ALBEF(cfg, mlm_head=meta["mlm_head"])
    if task == "vqa":
        return ALBEFForVQA(cfg, meta["decoder_layers"])
    if task == "classification":
        return ALBEFForClassification(cfg, meta["num_classes"], meta["num_images"])
    raise ValueError(f"unknown model task {task!r} in config.json")


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
    (d / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    (tokenizer or Tokenizer(add_sep=model.config.add_sep)).save(d)
    return d


def from_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, expect: type | None = None) -> torch.nn.Module:
    """Load a folder written by :func:`save_pretrained`, strictly (the right model class).

    ``expect``: the class the caller needs; another model in the folder is a clear error.
    """
    d = Path(directory)
    cfg_path = d / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {d} is not an albef model folder "
                                "(convert an authors' checkpoint with `albef convert SRC DST`)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = _build(meta)
    if expect is not None and not isinstance(model, expect):
        raise ValueError(f"{d} holds a {type(model).__name__} ({meta.get('task')} model), not a {expect.__name__}")
    try:
        state = load_file(str(d / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{d / WEIGHTS}: cannot be read ({e}); the folder is incomplete or corrupt") from e
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()
