"""Image transforms of the ALBEF reference (salesforce/ALBEF ``dataset/``).

The reference RandAugment works on numpy arrays through OpenCV; this port keeps
its op list, magnitudes and sampling scheme but uses torchvision on PIL images,
and draws every random number from torch's global RNG so that
``torch.manual_seed`` (and DataLoader worker seeding) makes it reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
MAX_LEVEL = 10
_FILL = 128  # the reference's grey border value (128, 128, 128)
_TRANSLATE_CONST = 10  # pixels at MAX_LEVEL
_SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


class RandomAugment(torch.nn.Module):
    """ALBEF's RandAugment: ``n`` ops drawn with replacement, each applied with p=0.5.

    Magnitude ``m`` (0..10) maps to: Brightness/Sharpness factor ``m/10*1.8+0.1``;
    shear factor ``m/10*0.3``; translation ``m`` pixels; rotation ``m/10*30``
    degrees. Geometric ops get a random sign and a grey (128) border.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> out = RandomAugment(2, 7)(Image.new("RGB", (32, 32)))
        >>> out.size
        (32, 32)
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 7,
        ops: Sequence[str] = DEFAULT_OPS,
        interpolation: InterpolationMode = InterpolationMode.NEAREST,
    ) -> None:
        super().__init__()
        unknown = [op for op in ops if op not in DEFAULT_OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment op(s) {unknown}; known: {DEFAULT_OPS}")
        if len(ops) == 0:
            raise ValueError("RandomAugment needs at least one op")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"m must be in [0, {MAX_LEVEL}], got {m}")
        self.n, self.m, self.ops = n, m, tuple(ops)
        self.interpolation = interpolation

    def forward(self, img: Image.Image) -> Image.Image:
        # Same draw order as the reference: all op choices first, then per op a
        # coin flip, then (only if applied) the sign of a geometric magnitude.
        idx = torch.randint(len(self.ops), (self.n,)).tolist()
        for i in idx:
            if torch.rand(()).item() >= 0.5:
                continue
            name = self.ops[i]
            negate = name in _SIGNED_OPS and torch.rand(()).item() < 0.5
            img = self.apply_op(img, name, negate=negate)
        return img

    def apply_op(self, img: Image.Image, name: str, negate: bool = False) -> Image.Image:
        """Apply op ``name`` deterministically at magnitude ``self.m``.

        ``negate`` flips the direction of geometric ops. With ``negate=False``
        ShearX moves pixel (y, x) to (y, x + f*y) and TranslateX moves content
        ``m`` pixels to the left, exactly as the reference's OpenCV matrices.

        Example:
            >>> RandomAugment(1, 7).apply_op(Image.new("RGB", (8, 8), (100,) * 3),
            ...                              "Brightness").getpixel((0, 0))
            (136, 136, 136)
        """
        level = self.m / MAX_LEVEL
        sign = -1.0 if negate else 1.0
        fill = [_FILL] * len(img.getbands())  # torchvision wants one value per band
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return F.autocontrast(img)
        if name == "Equalize":
            return F.equalize(img)
        if name in ("Brightness", "Sharpness"):
            factor = level * 1.8 + 0.1
            fn = F.adjust_brightness if name == "Brightness" else F.adjust_sharpness
            return fn(img, factor)
        if name in ("ShearX", "ShearY"):
            # torchvision's shear matrix is [[1, -tan(s)], ...], hence the minus.
            # The centre (0.5, 0.5) is the middle of pixel (0, 0) in PIL's
            # coordinates, matching OpenCV's origin at the first pixel centre.
            deg = -math.degrees(math.atan(sign * level * 0.3))
            shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
            return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                            interpolation=self.interpolation, fill=fill, center=[0.5, 0.5])
        if name in ("TranslateX", "TranslateY"):
            # Reference matrix [[1, 0, -offset], ...] shifts content by -offset.
            offset = -sign * level * _TRANSLATE_CONST
            translate = [offset, 0.0] if name == "TranslateX" else [0.0, offset]
            return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                            interpolation=self.interpolation, fill=fill)
        if name == "Rotate":
            # Positive angle is counter-clockwise in both OpenCV and torchvision.
            return F.rotate(img, sign * level * 30.0, interpolation=self.interpolation, fill=fill)
        raise ValueError(f"unknown RandomAugment op {name!r}")

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, ops={list(self.ops)}"


def train_transform(
    image_size: int, scale: tuple[float, float] = (0.2, 1.0), randaugment: bool = True
) -> T.Compose:
    """Training pipeline: random crop, flip, RandAugment(2, 7), CLIP normalisation.

    Use ``scale=(0.2, 1.0)`` for pretraining and ``(0.5, 1.0)`` for fine-tuning.
    Note: the horizontal flip silently contradicts captions that mention
    "left"/"right"; the reference flips anyway and so do we.

    Example:
        >>> train_transform(64)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    steps: list = [
        T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if randaugment:
        steps.append(RandomAugment(2, 7))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def test_transform(image_size: int) -> T.Compose:
    """Evaluation pipeline: bicubic resize to a square (no crop), CLIP normalisation.

    Example:
        >>> test_transform(32)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    return T.Compose([
        T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


test_transform.__test__ = False  # keep pytest from collecting it as a test


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation of a (3, H, W) or (B, 3, H, W) tensor, clamped to [0, 1].

    Example:
        >>> x = test_transform(8)(Image.new("RGB", (8, 8), (255, 0, 0)))
        >>> denormalize(x)[:, 0, 0]
        tensor([1., 0., 0.])
    """
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=tensor.dtype, device=tensor.device).view(shape)
    std = torch.tensor(CLIP_STD, dtype=tensor.dtype, device=tensor.device).view(shape)
    return (tensor * std + mean).clamp(0.0, 1.0)
