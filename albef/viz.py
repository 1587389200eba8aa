"""Heat-map overlays for Grad-CAM results."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image
from torch import Tensor


def overlay(
    image: Image.Image,
    heat: Tensor,
    alpha: float = 0.5,
    boxes: list[tuple[float, ...]] | None = None,
    highlight: int | None = None,
) -> Image.Image:
    """Blend a [H, W] heat map (any range) over ``image`` with the jet colour map; draw boxes."""
    h = heat.detach().float().cpu().numpy()
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    colored = (colormaps["jet"](h)[..., :3] * 255).astype(np.uint8)
    base = np.asarray(image.convert("RGB").resize((h.shape[1], h.shape[0])), dtype=np.float32)
    out = Image.fromarray((base * (1 - alpha) + colored * alpha).astype(np.uint8))
    if boxes:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(out)
        for i, (x, y, w, bh) in enumerate(boxes):
            draw.rectangle(
                [x, y, x + w, y + bh],
                outline=(255, 255, 255) if i != highlight else (0, 255, 0),
                width=2 if i == highlight else 1,
            )
    return out
