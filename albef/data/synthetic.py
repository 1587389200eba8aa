"""Generated image–caption pairs: coloured shapes on a plain background.

Used by the built-in demo and by tests that need data with a known right answer and no files:
the caption names the colour, the shape and where it sits, so a model that learns anything
aligns them.

Example:
    >>> images, captions = make_shapes(4, image_size=32, generator=torch.Generator().manual_seed(0))
    >>> images.shape, len(captions)
    (torch.Size([4, 3, 32, 32]), 4)
"""

from __future__ import annotations

import torch
from torch import Tensor

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.1, 0.7),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right", "top", "bottom")


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> Tensor:
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dy, dx = (y - cy) / r, (x - cx) / r
    if shape == "circle":
        return dy**2 + dx**2 <= 1
    if shape == "square":
        return (dy.abs() <= 0.85) & (dx.abs() <= 0.85)
    return (dy <= 0.8) & (dy >= -0.9) & (dx.abs() <= (dy + 0.9) / 1.7 * 0.95)  # triangle, apex up


def make_shapes(
    n: int,
    image_size: int = 64,
    generator: torch.Generator | None = None,
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
) -> tuple[Tensor, list[str]]:
    """``n`` normalised images [n, 3, S, S] and their captions (see :func:`render_shapes`)."""
    images, captions = render_shapes(n, image_size, generator)
    return (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), captions


def render_shapes(n: int, image_size: int = 64, generator: torch.Generator | None = None) -> tuple[Tensor, list[str]]:
    """``n`` images [n, 3, S, S] in [0, 1] and their captions ("a red circle on the left").

    The ``n`` captions are distinct while ``n`` is at most the number of combinations (72), so
    a batch holds no false negatives for the contrastive loss.
    """
    g = generator or torch.Generator().manual_seed(0)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in PLACES]
    order = torch.cat([torch.randperm(len(combos), generator=g) for _ in range(-(-n // len(combos)))])
    images = torch.empty(n, 3, image_size, image_size)
    captions = []
    for i in range(n):
        color, shape, place = combos[int(order[i])]
        s = image_size
        cy, cx = {
            "left": (s / 2, s / 4),
            "right": (s / 2, 3 * s / 4),
            "top": (s / 4, s / 2),
            "bottom": (3 * s / 4, s / 2),
        }[place]
        background = 0.25 + 0.1 * torch.rand(3, 1, 1, generator=g)
        img = background.expand(3, s, s).clone()
        mask = _shape_mask(shape, s, cy, cx, s / 5)
        img[:, mask] = torch.tensor(COLORS[color]).unsqueeze(1)
        img += 0.03 * torch.randn(img.shape, generator=g)
        images[i] = img.clamp(0, 1)
        captions.append(f"a {color} {shape} on the {place}")
    return images, captions
