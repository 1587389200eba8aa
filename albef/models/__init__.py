"""Model code: the plain ViT, BERT text/fusion encoder and ALBEF model, and the speed layer
(:mod:`albef.models.fast`) that models are built with."""

from albef.models.albef import ALBEF
from albef.models.bert import TextEncoder
from albef.models.fast import ImageContext, is_fast, make_fast, make_plain
from albef.models.fusion import FusionRows, Positions
from albef.models.vit import VisionTransformer, resize_pos_embed

__all__ = [
    "ALBEF",
    "FusionRows",
    "ImageContext",
    "Positions",
    "TextEncoder",
    "VisionTransformer",
    "is_fast",
    "make_fast",
    "make_plain",
    "resize_pos_embed",
]
