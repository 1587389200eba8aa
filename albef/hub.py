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
from albef.text import Tokenizer

FORMAT = "albef-model/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model: ALBEF, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write the inference model (no momentum copy, no queues) and its tokenizer to ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "mlm_head": model.mlm_head is not None, "config": model.config.to_dict()}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
                    dtype: torch.dtype | None = None) -> ALBEF:
    """Load a folder written by :func:`save_pretrained`, strictly."""
    d = Path(directory)
    cfg_path = d / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {d} is not an albef model folder "
                                "(convert an authors' checkpoint with `albef convert SRC DST`)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = ALBEF(ALBEFConfig.from_dict(meta["config"]), mlm_head=meta["mlm_head"])
    try:
        state = load_file(str(d / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{d / WEIGHTS}: cannot be read ({e}); the folder is incomplete or corrupt") from e
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()
