"""Weights on disk: the project's model folders, the authors' checkpoints and third-party
initialisations, and crash-safe checkpoint files. The model code never imports this package.

- :mod:`~albef.checkpoints.pretrained`: ``config.json`` + ``model.safetensors`` folders, and any
  model path (folder, a run's checkpoint, a run folder) to an inference model.
- :mod:`~albef.checkpoints.convert`: the authors' (and LAVIS's) key layout to ours and back.
- :mod:`~albef.checkpoints.loading`: strict loading with a report of every tensor; BERT and ViT
  initialisations from local Hugging Face / timm files.
- :mod:`~albef.checkpoints.files`: atomic writes and checked reads of ``.pt`` files.

Example:
    >>> from albef import ALBEF, get_preset
    >>> from albef.checkpoints import from_pretrained, save_pretrained
    >>> save_pretrained(ALBEF(get_preset("albef-tiny")), "/tmp/albef-tiny")   # doctest: +SKIP
    >>> model = from_pretrained("/tmp/albef-tiny", expect=ALBEF)               # doctest: +SKIP
"""

from albef.checkpoints.files import CheckpointError, load_checkpoint, save_checkpoint
from albef.checkpoints.loading import CheckpointLoadError, LoadReport, load_albef, load_authors_checkpoint
from albef.checkpoints.pretrained import NotAModelError, from_pretrained, load_model, save_pretrained

__all__ = [
    "CheckpointError",
    "CheckpointLoadError",
    "LoadReport",
    "NotAModelError",
    "from_pretrained",
    "load_albef",
    "load_authors_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_pretrained",
]
