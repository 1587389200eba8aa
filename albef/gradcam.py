"""Grad-CAM on ALBEF's cross-attention (ITM mode) and box scoring, as the authors do it.

ITM mode: the positive ITM logit is back-propagated to the cross-attention probabilities of one
fusion layer (the authors use the third of six, BERT layer 8; :func:`default_gradcam_layer` keeps
that relative depth for other models); the map is ``attention × relu(gradient)`` over the image
patches, masked by the text mask, averaged over heads and then over text tokens.

Example:
    >>> heat = gradcam_itm(model, images, ids, mask)          # doctest: +SKIP
    >>> heat.shape                                             # [B, grid, grid]   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from albef.config import TextConfig
from albef.models.albef import ALBEF


def gradcam_layer_for(text: TextConfig) -> int:
    """The fusion layer a third of the way into the fusion layers: the authors' layer 8 of BERT-base
    (the third of six, fusion from layer 6); the second of three for ``albef-small`` (layer 4).

    The relative depth, not the last fusion layer: on the main job's scenes the last layer's map
    points at the named object less often than the earlier ones at every checkpoint measured
    (docs/results.md).

    Example:
        >>> from albef.config import get_preset
        >>> gradcam_layer_for(get_preset("albef-base").text), gradcam_layer_for(get_preset("albef-small").text)
        (8, 4)
    """
    fusion = text.num_layers - text.fusion_layer
    return text.fusion_layer + round(fusion / 3)


def default_gradcam_layer(model: ALBEF) -> int:
    """:func:`gradcam_layer_for` the model's text config."""
    return gradcam_layer_for(model.config.text)


def gradcam_itm(
    model: ALBEF, images: Tensor, input_ids: Tensor, attention_mask: Tensor, layer: int | None = None
) -> Tensor:
    """Grad-CAM maps [B, grid, grid] of each (image b, text b) pair."""
    layer = default_gradcam_layer(model) if layer is None else layer
    if layer < model.config.text.fusion_layer:
        raise ValueError(f"layer {layer} has no cross-attention (fusion starts at {model.config.text.fusion_layer})")
    attn = model.text_encoder.encoder.layer[layer].crossattention.self
    attn.save_attention = True
    try:
        with torch.enable_grad():
            fused = model.encode_multimodal(input_ids, attention_mask, model.encode_image(images))
            cam = attn.attention_map
            # the gradient of the attention map only: the caller's parameter gradients stay untouched
            (grad,) = torch.autograd.grad(model.itm_logits(fused)[:, 1].sum(), cam)
        cam = cam.detach()
    finally:
        attn.save_attention = False
        attn.attention_map = None
    B, H, L, _ = cam.shape
    g = model.config.vision.grid_size
    mask = attention_mask.view(B, 1, L, 1, 1).to(cam.dtype)
    cam = cam[..., 1:].reshape(B, H, L, g, g) * mask
    grad = grad[..., 1:].clamp(min=0).reshape(B, H, L, g, g) * mask
    return (cam * grad).mean(1).mean(1)


def default_gradcam_block(model: ALBEF) -> int:
    """The authors' ITC-mode block: 8 of a 12-block ViT (``--block_num 8``), the same relative
    depth (two thirds) for other depths."""
    return (2 * len(model.visual_encoder.blocks)) // 3


def gradcam_itc(
    model: ALBEF, images: Tensor, input_ids: Tensor, attention_mask: Tensor, block: int | None = None
) -> Tensor:
    """ITC-mode Grad-CAM [B, grid, grid]: the [CLS] row of a ViT block's self-attention, weighted by
    the gradient of the pair's contrastive similarity (default block: :func:`default_gradcam_block`)."""
    vit = model.visual_encoder
    block = default_gradcam_block(model) if block is None else block
    if not 0 <= block < len(vit.blocks):
        raise ValueError(f"block {block} does not exist: the ViT has blocks 0-{len(vit.blocks) - 1}")
    attn = vit.blocks[block].attn
    attn.save_attention = True
    try:
        with torch.enable_grad():
            image_feat = model.image_feat(model.encode_image(images))
            cam = attn.attention_map
            text_feat = model.text_feat(model.encode_text(input_ids, attention_mask), attention_mask)
            (grad,) = torch.autograd.grad((image_feat * text_feat).sum(-1).div(model.temp).sum(), cam)
        cam = cam.detach()
    finally:
        attn.save_attention = False
        attn.attention_map = None
    g = model.config.vision.grid_size
    B, H = cam.shape[:2]
    cam = cam[:, :, 0, 1:].reshape(B, H, g, g)
    grad = grad[:, :, 0, 1:].clamp(min=0).reshape(B, H, g, g)
    return (cam * grad).mean(1)


def upsample_heatmap(heat: Tensor, height: int, width: int) -> Tensor:
    """[g, g] -> [height, width], bicubic, as the authors' box scoring does."""
    return F.interpolate(heat[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def box_scores(heat: Tensor, boxes: Tensor, alpha: float = 0.5) -> Tensor:
    """Score of each box ``(x, y, w, h)`` in pixels: ``sum(heat inside) / area**alpha``.

    ``heat`` is the map at image resolution [H, W]. Coordinates are truncated to integers like
    the reference's ``mask[int(y):int(y+h), int(x):int(x+w)]``.
    """
    scores = []
    for x, y, w, h in boxes.tolist():
        inside = heat[int(y) : int(y + h), int(x) : int(x + w)]
        scores.append(inside.sum() / max(w * h, 1e-12) ** alpha)
    return torch.stack(scores) if scores else heat.new_zeros(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``(x, y, w, h)``: [N] for paired rows of ``a`` and ``b``."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = (torch.minimum(ax2, bx2) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)
