"""ALBEF: Align before Fuse (Li et al., 2021), faithful and fast, in PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

from albef.checkpoints.pretrained import from_pretrained, load_model, save_pretrained
from albef.config import ALBEFConfig, TextConfig, VisionConfig, get_preset
from albef.models import ALBEF

__version__ = "0.1.0"
__all__ = [
    "ALBEF",
    "ALBEFConfig",
    "Pipeline",
    "Processor",
    "VQAPipeline",
    "TextConfig",
    "VisionConfig",
    "from_pretrained",
    "get_preset",
    "load_model",
    "save_pretrained",
    "__version__",
]

# The inference API needs torchvision's transforms, whose import alone takes ~1.5 s (it loads
# torch._dynamo and triton): loaded on first use, so `import albef` and the CLI start without it.
_LAZY = {"Pipeline": "albef.api", "Processor": "albef.api", "VQAPipeline": "albef.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'albef' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
