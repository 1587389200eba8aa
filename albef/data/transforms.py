"""Image transforms of the ALBEF reference (salesforce/ALBEF ``dataset/``).

The reference RandAugment works on numpy arrays through OpenCV; this one keeps
its op list, magnitudes and sampling scheme on PIL images, with the geometric
ops through OpenCV's own ``warpAffine`` (its bilinear fixed-point sampling is
what the reference trained with), and draws every random number from torch's
global RNG so that ``torch.manual_seed`` (and DataLoader worker seeding) makes
it reproducible.

Every op gives the reference's pixels with the default arguments, checked against the
reference's formulas in ``tests/test_transforms.py``:

* Identity, Brightness (same float32 lookup table, truncated), Equalize (PIL's
  equalize is the formula the reference re-implements) and Sharpness (same
  ``[[1,1,1],[1,5,1],[1,1,1]]/13`` smoothing rounded to uint8, border pixels
  left unchanged, same float32 blend cast to uint8) are bit-exact.
* ShearX/ShearY/TranslateX/TranslateY/Rotate: the reference's matrices
  (shear and translation in float32, rotation getRotationMatrix2D's float64, about
  ``(W/2, H/2)`` in OpenCV's pixel-centre coordinates), bilinear, grey (128) border:
  bit-exact.
* AutoContrast: the reference's formula, bit-exact.

Two of the reference's behaviours are uint8 wrap-arounds; each has a flag, on by default (the
authors' augmentation), whose ``False`` fixes it:

* ``sharpness_wrap``: the reference casts the sharpened float image to uint8
  without clipping, so values below 0 or above 255 (next to strong edges)
  wrap around (``-3 -> 253``, ``300 -> 44``, as numpy does on x86) and show up
  as salt-and-pepper pixels. ``False``: clip to [0, 255].
* ``autocontrast_wrap``: the reference computes ``offset = -low * scale`` with
  ``low`` a numpy uint8 scalar, so ``-low`` wraps to ``256 - low`` and every
  channel whose minimum is above 0 (and not constant) becomes all 255. Channels
  with minimum 0 are unaffected. ``False``: PIL's autocontrast (the behaviour
  the reference's docstring promises).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10
_FILL = 128  # the reference's grey border value (128, 128, 128)
_TRANSLATE_CONST = 10  # pixels at MAX_LEVEL
_SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
_CV2_INTERPOLATION = {
    InterpolationMode.NEAREST: cv2.INTER_NEAREST,
    InterpolationMode.BILINEAR: cv2.INTER_LINEAR,
    InterpolationMode.BICUBIC: cv2.INTER_CUBIC,
}


def _f32(x: float) -> float:
    """Round to float32, as the reference's ``np.float32`` warp matrices do."""
    return float(np.float32(x))


def _warp(img: Image.Image, m: Sequence[Sequence[float]], interpolation: InterpolationMode, fill: int) -> Image.Image:
    """``cv2.warpAffine(img, m, (W, H), flags, borderValue=fill)``: the reference's own call.

    ``m`` maps source to destination in OpenCV coordinates (pixel (x, y) centred at (x, y)).
    OpenCV's bilinear warp samples positions rounded to 1/32 pixel in fixed point; PIL's differs
    from it by up to 5 grey levels, so the warp is OpenCV's, not a port of it.
    """
    a = np.asarray(img)
    out = cv2.warpAffine(
        a,
        # float64: the reference's rotation matrix is getRotationMatrix2D's (shear and translate
        # entries come in already rounded to float32, as the reference's np.float32 matrices)
        np.asarray(m, dtype=np.float64),
        (img.width, img.height),
        flags=_CV2_INTERPOLATION[interpolation],
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill,) * 4,
    )
    return Image.fromarray(out.reshape(a.shape), mode=img.mode)


def _sharpness(img: Image.Image, factor: float, wrap: bool) -> Image.Image:
    """The reference's Sharpness: blend with a 3x3 smoothing, border pixels kept."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    if h < 3 or w < 3:
        return img.copy()
    out = a.copy()
    f = np.float32(factor)
    block = max(1, 16384 // a[0].size)  # rows per step; small temporaries are cheaper
    for r0 in range(1, h - 1, block):
        r1 = min(h - 1, r0 + block)
        x = a[r0 - 1 : r1 + 1].astype(np.int16)
        col = x[:-2] + x[1:-1] + x[2:]  # vertical 3-sums
        centre = x[1:-1, 1:-1]
        s = col[:, :-2] + col[:, 1:-1] + col[:, 2:] + 4 * centre  # kernel [[1,1,1],[1,5,1],[1,1,1]]
        # s / 13 rounded to nearest, as cv2.filter2D into uint8 (s / 13 is never a tie).
        degenerate = np.rint(s.astype(np.float32) / np.float32(13))
        blend = degenerate + f * (centre.astype(np.float32) - degenerate)  # float32, as the reference
        if wrap:  # numpy's unclipped float -> uint8 cast on x86: truncate, then modulo 256
            inner = np.trunc(blend).astype(np.int32) & 255
        else:
            inner = np.clip(blend, 0, 255)
        out[r0:r1, 1:-1] = inner.astype(np.uint8)
    return Image.fromarray(out, mode=img.mode)


def _autocontrast_wrapped(img: Image.Image) -> Image.Image:
    """The reference's AutoContrast including its uint8 wrap of ``-low``."""
    lut: list[int] = []
    for band in img.split():
        lo, hi = band.getextrema()
        if hi <= lo:
            lut += range(256)
            continue
        scale = 255 / (hi - lo)
        offset = ((256 - lo) % 256) * scale  # -np.uint8(lo) == (256 - lo) % 256
        lut += np.clip(np.arange(256) * scale + offset, 0, 255).astype(np.uint8).tolist()
    return img.point(lut)


class RandomAugment(torch.nn.Module):
    """ALBEF's RandAugment: ``n`` ops drawn with replacement, each applied with p=0.5.

    Magnitude ``m`` (0..10) maps to: Brightness/Sharpness factor ``m/10*1.8+0.1``;
    shear factor ``m/10*0.3``; translation ``m`` pixels; rotation ``m/10*30``
    degrees. Geometric ops get a random sign and a grey (128) border.

    ``interpolation`` (NEAREST, BILINEAR or BICUBIC) is the geometric ops'
    sampling; the reference's is BILINEAR. ``sharpness_wrap`` and
    ``autocontrast_wrap`` reproduce two uint8 wrap-arounds of the reference bit
    for bit; both are on by default, ``False`` fixes each (see the module docstring).

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
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        sharpness_wrap: bool = True,
        autocontrast_wrap: bool = True,
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
        if interpolation not in _CV2_INTERPOLATION:
            raise ValueError(f"interpolation must be one of {list(_CV2_INTERPOLATION)}, got {interpolation}")
        self.n, self.m, self.ops = n, m, tuple(ops)
        self.interpolation = interpolation
        self.sharpness_wrap, self.autocontrast_wrap = sharpness_wrap, autocontrast_wrap

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
        ShearX moves pixel (y, x) to (y, x + f*y), TranslateX moves content
        ``m`` pixels to the left and Rotate turns counter-clockwise, exactly as
        the reference's OpenCV matrices.

        Example:
            >>> RandomAugment(1, 7).apply_op(Image.new("RGB", (8, 8), (100,) * 3),
            ...                              "Brightness").getpixel((0, 0))
            (136, 136, 136)
        """
        level = self.m / MAX_LEVEL
        sign = -1.0 if negate else 1.0
        bands = len(img.getbands())
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return _autocontrast_wrapped(img) if self.autocontrast_wrap else F.autocontrast(img)
        if name == "Equalize":
            return F.equalize(img)
        if name == "Brightness":
            factor = level * 1.8 + 0.1
            # The reference's lookup table: float32 product, clipped, truncated.
            table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255)
            return img.point(table.astype(np.uint8).tolist() * bands)
        if name == "Sharpness":
            return _sharpness(img, level * 1.8 + 0.1, self.sharpness_wrap)
        if name in ("ShearX", "ShearY"):
            f = _f32(sign * level * 0.3)
            m = [[1.0, f, 0.0], [0.0, 1.0, 0.0]] if name == "ShearX" else [[1.0, 0.0, 0.0], [f, 1.0, 0.0]]
            return _warp(img, m, self.interpolation, _FILL)
        if name in ("TranslateX", "TranslateY"):
            # The reference samples the source ``offset`` pixels further on.
            t = -_f32(sign * level * float(_TRANSLATE_CONST))
            m = [[1.0, 0.0, t], [0.0, 1.0, 0.0]] if name == "TranslateX" else [[1.0, 0.0, 0.0], [0.0, 1.0, t]]
            return _warp(img, m, self.interpolation, _FILL)
        if name == "Rotate":
            # cv2.getRotationMatrix2D((W/2, H/2), angle, 1); positive = counter-clockwise.
            rad = math.radians(sign * level * 30)
            al, be = math.cos(rad), math.sin(rad)
            cx, cy = img.width / 2, img.height / 2
            m = [[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]]
            return _warp(img, m, self.interpolation, _FILL)
        raise ValueError(f"unknown RandomAugment op {name!r}")

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, m={self.m}, ops={list(self.ops)}, interpolation={self.interpolation.value}, "
            f"sharpness_wrap={self.sharpness_wrap}, autocontrast_wrap={self.autocontrast_wrap}"
        )


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    randaugment: bool = True,
    *,
    crop: bool = True,
    uint8_wrap: bool = True,
    flip: bool = True,
) -> T.Compose:
    """Training pipeline: random crop, flip, RandAugment(2, 7), CLIP normalisation.

    Use ``scale=(0.2, 1.0)`` for pretraining and ``(0.5, 1.0)`` for fine-tuning.
    ``crop=False`` replaces the random crop with a bicubic resize of the whole
    image to ``image_size`` x ``image_size`` (``scale`` is then unused): the
    reference's grounding fine-tuning pipeline, which must not crop the
    referred object out of the image. ``uint8_wrap`` sets both of RandomAugment's
    reference wrap-arounds (``sharpness_wrap``, ``autocontrast_wrap``; on, as the authors).
    ``flip=False`` drops the horizontal flip: for captions that say left or right, which the
    flip makes false half the time.
    Note: the horizontal flip silently contradicts captions that mention
    "left"/"right"; the reference flips anyway and so do we.

    Example:
        >>> train_transform(64)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
        >>> train_transform(64, crop=False)(Image.new("RGB", (300, 20))).shape  # no crop: squashed
        torch.Size([3, 64, 64])
    """
    if crop:
        first = T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)
    else:
        first = T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    steps: list = [first, T.RandomHorizontalFlip()] if flip else [first]
    if randaugment:
        steps.append(RandomAugment(2, 7, sharpness_wrap=uint8_wrap, autocontrast_wrap=uint8_wrap))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def test_transform(image_size: int) -> T.Compose:
    """Evaluation pipeline: bicubic resize to a square (no crop), CLIP normalisation.

    Example:
        >>> test_transform(32)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


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
