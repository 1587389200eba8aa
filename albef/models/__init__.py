"""Model code: the ViT, the BERT text/fusion encoder and the ALBEF model."""

from albef.models.albef import ALBEF
from albef.models.bert import ImageContext, TextEncoder
from albef.models.vit import VisionTransformer, resize_pos_embed

__all__ = ["ALBEF", "ImageContext", "TextEncoder", "VisionTransformer", "resize_pos_embed"]
