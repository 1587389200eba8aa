"""ALBEF: Align before Fuse (Li et al., 2021), faithful and fast, in PyTorch."""

from albef.config import ALBEFConfig, TextConfig, VisionConfig, get_preset
from albef.models import ALBEF
from albef.api import Pipeline, Processor, VQAPipeline

__version__ = "0.1.0"
__all__ = ["ALBEF", "ALBEFConfig", "Pipeline", "Processor", "VQAPipeline", "TextConfig", "VisionConfig", "get_preset", "__version__"]
