"""Tests for albef.data.transforms against hand-computed expectations and, for
RandomAugment's ops, against the reference's OpenCV/numpy formulas written out
here (salesforce/ALBEF ``dataset/randaugment.py``)."""

from __future__ import annotations

import math
import platform
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from albef.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_OPS,
    RandomAugment,
    denormalize,
    test_transform,
    train_transform,
)


def _const(v: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, (v, v, v))


def _dot(h: int, w: int, y: int, x: int) -> Image.Image:
    """Black h x w image with one white pixel at row y, column x."""
    a = np.zeros((h, w, 3), np.uint8)
    a[y, x] = 255
    return Image.fromarray(a)


def _white(img: Image.Image) -> list[tuple[int, int]]:
    ys, xs = np.nonzero(np.asarray(img)[..., 0] == 255)
    return list(zip(ys.tolist(), xs.tolist(), strict=True))


def _noise(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_test_transform_normalises_constant_grey():
    out = test_transform(16)(_const(100, (40, 30)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        expected = (100 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(out[c], torch.full((16, 16), expected), atol=1e-5)


def test_denormalize_inverts_normalisation_and_clamps():
    img = _noise(size=16)
    x = test_transform(16)(img)
    assert torch.allclose(denormalize(x), T.ToTensor()(img), atol=1e-5)
    batch = torch.stack([x, x])
    assert torch.allclose(denormalize(batch)[1], denormalize(x))
    big = denormalize(torch.full((3, 2, 2), 100.0))
    assert big.min() == 1.0 and denormalize(-big * 100).max() == 0.0


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 1.0)])
def test_train_transform_shape_and_components(scale):
    tf = train_transform(32, scale=scale)
    out = tf(_noise())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    crop = tf.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == scale
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(tf.transforms[1], T.RandomHorizontalFlip)
    aug = tf.transforms[2]
    assert isinstance(aug, RandomAugment) and (aug.n, aug.m, aug.ops) == (2, 7, DEFAULT_OPS)
    plain = train_transform(32, randaugment=False)
    assert not any(isinstance(t, RandomAugment) for t in plain.transforms)


def test_train_transform_reproducible_under_torch_seed_only():
    tf, img = train_transform(24), _noise()
    torch.manual_seed(123)
    np.random.seed(1), random.seed(1)
    a = tf(img)
    torch.manual_seed(123)
    np.random.seed(2), random.seed(2)  # other RNGs must not matter
    b = tf(img)
    assert torch.equal(a, b)
    torch.manual_seed(124)
    assert not torch.equal(a, tf(img))


def test_randaugment_varies_across_seeds():
    aug, img = RandomAugment(2, 7), _noise(size=24)
    outs = set()
    for s in range(20):
        torch.manual_seed(s)
        outs.add(np.asarray(aug(img)).tobytes())
    assert len(outs) > 5


def test_identity_brightness_and_saturation():
    aug = RandomAugment(1, 7)
    assert aug.apply_op(_const(77), "Identity").getpixel((0, 0)) == (77,) * 3
    # factor (7/10)*1.8 + 0.1 = 1.36: 100 -> 136, 200 -> 272 clipped to 255
    assert aug.apply_op(_const(100), "Brightness").getpixel((3, 3)) == (136,) * 3
    assert aug.apply_op(_const(200), "Brightness").getpixel((3, 3)) == (255,) * 3


def test_sharpness_on_isolated_pixel():
    a = np.zeros((5, 5, 3), np.uint8)
    a[2, 2] = 130
    out = np.asarray(RandomAugment(1, 7).apply_op(Image.fromarray(a), "Sharpness"))
    # Smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 gives 50 at the centre;
    # blend 50 + 1.36*(130-50) = 158.8, truncated to uint8 as in the reference.
    assert out[2, 2, 0] == 158
    assert out[2, 3, 0] == 253  # 10 + 1.36*(0-10) = -3.6 -> -3 -> wraps to 253, as the reference
    fixed = np.asarray(RandomAugment(1, 7, sharpness_wrap=False).apply_op(Image.fromarray(a), "Sharpness"))
    assert fixed[2, 2, 0] == 158 and fixed[2, 3, 0] == 0  # clipped


def test_autocontrast_and_equalize_stretch_to_full_range():
    a = np.full((64, 64, 3), 50, np.uint8)
    a[:, 32:] = 150
    aug = RandomAugment(1, 7)
    # the reference: -low wraps (low 50 -> 206), so offset 206 * 2.55 puts every value above 255
    assert (np.asarray(aug.apply_op(Image.fromarray(a), "AutoContrast")) == 255).all()
    fixed = RandomAugment(1, 7, autocontrast_wrap=False)
    out = np.asarray(fixed.apply_op(Image.fromarray(a), "AutoContrast"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 63].tolist() == [255, 255, 255]
    out = np.asarray(aug.apply_op(Image.fromarray(a), "Equalize"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 63].tolist() == [255, 255, 255]


@pytest.mark.parametrize("negate,shift", [(False, -7), (True, 7)])
def test_translate_moves_pixel_by_seven_and_fills_grey(negate, shift):
    aug = RandomAugment(1, 7)
    out = aug.apply_op(_dot(9, 20, 4, 10), "TranslateX", negate=negate)
    assert _white(out) == [(4, 10 + shift)]
    border = np.asarray(out)[:, -7:] if shift < 0 else np.asarray(out)[:, :7]
    assert (border == 128).all()
    out = aug.apply_op(_dot(20, 9, 10, 4), "TranslateY", negate=negate)
    assert _white(out) == [(10 + shift, 4)]


@pytest.mark.parametrize("negate", [False, True])
def test_shear_moves_pixel_proportionally_to_other_axis(negate):
    # NEAREST keeps the dot a single pixel, so the geometry can be read off directly.
    aug = RandomAugment(1, 7, interpolation=InterpolationMode.NEAREST)
    f, h, w = (-0.21 if negate else 0.21), 6, 10
    for y in range(h):
        for x in range(w):
            nx = round(x + f * y)  # reference matrix [[1, f, 0], [0, 1, 0]]
            if 0 <= nx < w:
                assert _white(aug.apply_op(_dot(h, w, y, x), "ShearX", negate=negate)) == [(y, nx)]
            ny = round(x + f * y)  # transposed image: row x, column y
            if 0 <= ny < w:
                assert _white(aug.apply_op(_dot(w, h, x, y), "ShearY", negate=negate)) == [(ny, y)]
    corner = aug.apply_op(_const(0, (w, h)), "ShearX", negate=negate)
    assert corner.getpixel((w - 1 if negate else 0, h - 1)) == (128,) * 3


def test_rotate_turns_counter_clockwise_about_opencv_centre():
    # The reference rotates about (W/2, H/2) in OpenCV's coordinates, where pixel
    # (x, y) has its centre at (x, y): for a 20 x 20 image that is pixel (10, 10),
    # which must stay put exactly, even under bilinear sampling.
    aug = RandomAugment(1, 7)
    black = np.zeros((20, 20, 3), np.uint8)
    a = black.copy()
    a[10, 10] = 255
    out = np.asarray(aug.apply_op(Image.fromarray(a), "Rotate"))
    assert out[10, 10].tolist() == [255] * 3
    assert out[0, 0].tolist() == [128] * 3  # corners rotate out of view: grey border
    # A pixel 4 right of the centre, turned 21 degrees counter-clockwise, lands at
    # (10 - 4 sin 21, 10 + 4 cos 21) = (8.57, 13.73); bilinear sampling spreads it
    # over its neighbours, whose centroid stays within half a pixel of that.
    a = black.copy()
    a[10, 14] = 255
    dy, dx = 4 * math.sin(math.radians(21)), 4 * math.cos(math.radians(21))
    for negate, ey in ((False, 10 - dy), (True, 10 + dy)):
        out = np.asarray(aug.apply_op(Image.fromarray(a), "Rotate", negate=negate))[..., 0]
        y0, x0 = round(ey) - 2, round(10 + dx) - 2
        win = out[y0 : y0 + 5, x0 : x0 + 5].astype(float)
        ys, xs = np.mgrid[y0 : y0 + 5, x0 : x0 + 5]
        assert win.sum() > 200  # most of the 255 units of the dot
        cy, cx = (win * ys).sum() / win.sum(), (win * xs).sum() / win.sum()
        assert abs(cy - ey) < 0.5 and abs(cx - 10 - dx) < 0.5


def test_argument_validation():
    with pytest.raises(ValueError):
        RandomAugment(2, 7, ops=("Identity", "Solarize"))
    with pytest.raises(ValueError):
        RandomAugment(2, 7, ops=())
    with pytest.raises(ValueError):
        RandomAugment(-1, 7)
    for m in (-1, 11):
        with pytest.raises(ValueError):
            RandomAugment(2, m)
    with pytest.raises(ValueError):
        RandomAugment(1, 7).apply_op(_const(0), "Cutout")
    with pytest.raises(ValueError):
        RandomAugment(2, 7, interpolation=InterpolationMode.BOX)
    assert RandomAugment(0, 7)(_const(9)).getpixel((0, 0)) == (9,) * 3


def test_application_probability_is_one_half():
    aug, img, trials = RandomAugment(1, 7, ops=("Brightness",)), _const(100, (4, 4)), 400
    applied = 0
    for s in range(trials):
        torch.manual_seed(s)
        applied += aug(img).getpixel((0, 0))[0] != 100
    # Binomial(400, 0.5): sd = 10, so +-5 sd is a very loose but safe bound.
    assert 150 <= applied <= 250


def test_ops_sampled_with_replacement_and_random_sign():
    seen, shifts = set(), set()
    double = RandomAugment(2, 7, ops=("Brightness",))
    translate = RandomAugment(1, 7, ops=("TranslateX",))
    for s in range(60):
        torch.manual_seed(s)
        seen.add(double(_const(100, (4, 4))).getpixel((0, 0))[0])
        torch.manual_seed(s)
        shifts.update(x for _, x in _white(translate(_dot(3, 20, 1, 10))))
    # 0, 1 or 2 applications: 100, 136, int(136 * 1.36) = 184 (same op twice).
    assert seen == {100, 136, 184}
    assert shifts == {3, 10, 17}


# --- RandomAugment against the reference's OpenCV/numpy formulas -------------------------
# Each ``_ref_*`` below is the reference's op written out with cv2/numpy, independent of albef.

_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _textures() -> list[np.ndarray]:
    """Deterministic textured RGB images, odd and even sizes (plus one greyscale)."""
    out = []
    for h, w in [(31, 31), (32, 48), (37, 52), (50, 23), (64, 64)]:
        y, x = np.mgrid[0:h, 0:w]
        out.append(np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1))
        chk = ((x // 4 + y // 3) % 2) * 200 + 30  # hard edges; channel minimum 30
        out.append(np.stack([chk, 255 - chk, (chk + 2 * x) % 256], -1))
        wave = 127.5 + 100 * np.sin(x / 3.0) * np.cos(y / 4.0)
        out.append(np.stack([wave, 255 - wave, wave / 2], -1))
    out.append(np.random.default_rng(0).integers(0, 256, (40, 33, 3)))
    return [a.astype(np.uint8) for a in out]


def _ref_warp(a: np.ndarray, name: str, negate: bool, m: int = 7, flags: int = cv2.INTER_LINEAR) -> np.ndarray:
    h, w = a.shape[:2]
    sign = -1 if negate else 1
    if name in ("ShearX", "ShearY"):
        f = sign * (m / 10) * 0.3
        mat = np.float32([[1, f, 0], [0, 1, 0]] if name == "ShearX" else [[1, 0, 0], [f, 1, 0]])
    elif name in ("TranslateX", "TranslateY"):
        off = sign * (m / 10) * 10.0
        mat = np.float32([[1, 0, -off], [0, 1, 0]] if name == "TranslateX" else [[1, 0, 0], [0, 1, -off]])
    else:
        mat = cv2.getRotationMatrix2D((w / 2, h / 2), sign * (m / 10) * 30, 1)
    return cv2.warpAffine(a, mat, (w, h), flags=flags, borderValue=(128, 128, 128))


def _ref_sharpness_float(a: np.ndarray, factor: float) -> np.ndarray:
    """The reference's blend before its final uint8 cast (border pixels unchanged)."""
    degenerate = cv2.filter2D(a, -1, _KERNEL).astype(np.float32)[1:-1, 1:-1]
    out = a.astype(np.float32)
    out[1:-1, 1:-1] = degenerate + factor * (out[1:-1, 1:-1] - degenerate)
    return out


def _uint8_cast_x86(x: np.ndarray) -> np.ndarray:
    """numpy's unclipped float -> uint8 cast as it behaves on x86: truncate, keep the low byte."""
    return (np.trunc(x).astype(np.int64) % 256).astype(np.uint8)


def _ref_autocontrast(a: np.ndarray, uint8_scalars: bool = True) -> np.ndarray:
    """The reference's AutoContrast; ``uint8_scalars=False`` uses Python ints for low/high."""
    channels = []
    for ch in cv2.split(a):
        high, low = ch.max(), ch.min()  # numpy uint8 scalars in the reference
        if not uint8_scalars:
            high, low = int(high), int(low)
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            with np.errstate(over="ignore"):
                offset = -low * scale  # with uint8 scalars -low wraps to 256 - low
            table = np.arange(256) * scale + offset
        channels.append(table.clip(0, 255).astype(np.uint8)[ch])
    return cv2.merge(channels)


def _ref_equalize(a: np.ndarray) -> np.ndarray:
    channels = []
    for ch in cv2.split(a):
        hist = cv2.calcHist([ch], [0], None, [256], [0, 256])
        step = np.sum(hist[hist != 0][:-1]) // 255
        if step == 0:
            channels.append(ch)
            continue
        n = np.empty_like(hist)
        n[0], n[1:] = step // 2, hist[:-1]
        channels.append((np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch])
    return cv2.merge(channels)


def _albef(a: np.ndarray, name: str, negate: bool = False, **kw) -> np.ndarray:
    return np.asarray(RandomAugment(1, kw.pop("m", 7), **kw).apply_op(Image.fromarray(a), name, negate=negate))


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("name", _GEOMETRIC)
def test_geometric_ops_match_reference_opencv_warp(name, negate):
    # The reference's matrices (float32), built here from its formulas and warped with OpenCV's
    # INTER_LINEAR and grey border: albef's warp must give the same pixels. PIL's bilinear with
    # the right geometry differs by up to 4-5 grey levels (mean up to 0.8), a rotation centre half
    # a pixel off or edge pixels replicated instead of grey by up to 64-92: exact equality catches
    # each of them.
    images = _textures()
    images.append(images[4][..., 1].copy())  # greyscale ("L") image
    # at 384 px the rotation's float64 matrix matters: in float32 some pixels move by a grey level or more
    images.append(np.random.default_rng(1).integers(0, 256, (384, 384, 3)).astype(np.uint8))
    for a in images:
        ref = _ref_warp(a, name, negate).astype(int)
        got = _albef(a, name, negate).astype(int)
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        assert diff.max() == 0, (a.shape, diff.max(), diff.mean())


def test_nearest_option_matches_reference_geometry_with_opencv_nearest():
    # The interpolation option changes only the sampling, not the geometry.
    for a in _textures():
        for name in _GEOMETRIC:
            for negate in (False, True):
                ref = _ref_warp(a, name, negate, flags=cv2.INTER_NEAREST)
                near = _albef(a, name, negate, interpolation=InterpolationMode.NEAREST)
                differ = (near != ref).any(-1).mean()
                assert differ == 0, (a.shape, name, differ)


@pytest.mark.parametrize("m", [0, 3, 7, 10])
def test_brightness_matches_reference_table(m):
    factor = (m / 10) * 1.8 + 0.1
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for a in _textures() + [np.stack([every_value, every_value.T, 255 - every_value], -1)]:
        assert (_albef(a, "Brightness", m=m) == table[a]).all()


@pytest.mark.parametrize("m", [3, 5, 7, 10])
def test_sharpness_matches_reference_where_in_range_and_clips_elsewhere_when_fixed(m):
    factor = (m / 10) * 1.8 + 0.1
    for a in _textures():
        blend = _ref_sharpness_float(a, factor)
        in_range = (blend >= 0) & (blend < 256)
        got = _albef(a, "Sharpness", m=m, sharpness_wrap=False)
        assert (got[in_range] == blend[in_range].astype(np.uint8)).all()
        assert (got == np.clip(blend, 0, 255).astype(np.uint8)).all()  # the fix: clamp
        assert (_albef(a, "Sharpness", m=m)[in_range] == got[in_range]).all()  # the default differs only outside


def test_sharpness_wrap_reproduces_reference_uint8_wraparound():
    a = np.zeros((12, 14, 3), np.uint8)
    a[3:9, 4:10] = 255  # a bright square: overshoot above 255 inside, below 0 outside its edges
    a[5:7, 6:8] = 40
    factor = 0.7 * 1.8 + 0.1
    blend = _ref_sharpness_float(a, factor)
    assert blend.min() < 0 and blend.max() > 255  # the image does trigger the wrap
    ref = _uint8_cast_x86(blend)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert (blend.astype(np.uint8) == ref).all()  # the reference's own cast, on this machine
    wrapped = _albef(a, "Sharpness")  # the default: the reference's wrap
    assert (wrapped == ref).all()
    clamped = _albef(a, "Sharpness", sharpness_wrap=False)
    assert (clamped == np.clip(blend, 0, 255).astype(np.uint8)).all()
    below, above = blend < 0, blend >= 256
    assert (clamped[below] == 0).all() and (clamped[above] == 255).all()
    assert (wrapped[below] > 200).all() and (wrapped[above] < 100).all()  # salt and pepper


def test_equalize_matches_reference():
    for a in _textures() + [np.full((9, 9, 3), 77, np.uint8)]:
        assert (_albef(a, "Equalize") == _ref_equalize(a)).all()


def test_autocontrast_matches_reference_and_documents_its_uint8_wrap():
    for a in _textures():
        ref = _ref_autocontrast(a)
        got = _albef(a, "AutoContrast", autocontrast_wrap=False)
        # The fix: the reference's formula with signed low/high (PIL's autocontrast).
        assert (got == _ref_autocontrast(a, uint8_scalars=False)).all()
        # Identical to the reference wherever a channel's minimum is 0 ...
        for c in range(3):
            if a[..., c].min() == 0:
                assert (got[..., c] == ref[..., c]).all()
        # ... and the default reproduces the reference everywhere.
        assert (_albef(a, "AutoContrast") == ref).all()
    chk = _textures()[1]  # channel minimum 30: the reference turns the channel white
    assert (_ref_autocontrast(chk)[..., 0] == 255).all()
    assert set(np.unique(_albef(chk, "AutoContrast", autocontrast_wrap=False)[..., 0])) == {0, 255}


def test_train_transform_without_crop_is_a_bicubic_resize_of_the_whole_image():
    a = np.zeros((60, 100, 3), np.uint8)
    a[:12, :20] = 255  # a small object in the top-left corner
    a[30:, :, 1] = np.arange(100, dtype=np.uint8)[None, :] * 2
    img = Image.fromarray(a)
    resized = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    expected = {False: resized, True: resized[:, ::-1]}
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    tf = train_transform(32, randaugment=False, crop=False)
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        got = tf(img).numpy().transpose(1, 2, 0) * std + mean
        matches = [flip for flip, e in expected.items() if np.allclose(got, e, atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
        corner = got[:4, -4:] if matches[0] else got[:4, :4]
        assert corner.min() > 0.95  # the corner object is never cut out
    assert seen == {False, True}  # both flip outcomes checked
    full = train_transform(32, crop=False)
    assert [type(t) for t in full.transforms] == [
        T.Resize,
        T.RandomHorizontalFlip,
        RandomAugment,
        T.ToTensor,
        T.Normalize,
    ]
    resize = full.transforms[0]
    assert resize.size == (32, 32) and resize.interpolation == InterpolationMode.BICUBIC
    assert (full.transforms[2].n, full.transforms[2].m) == (2, 7)


def test_recipe_randaugment_wrap_reaches_both_flags():
    from albef.data.transforms import train_transform

    def aug(**kw):
        return next(t for t in train_transform(32, **kw).transforms if isinstance(t, RandomAugment))

    assert (aug().sharpness_wrap, aug().autocontrast_wrap) == (True, True)  # the authors'
    assert (aug(uint8_wrap=False).sharpness_wrap, aug(uint8_wrap=False).autocontrast_wrap) == (False, False)
    from albef.recipes import DataSection

    assert DataSection().randaugment_wrap is True


def test_flip_can_be_turned_off():
    from albef.data.transforms import train_transform

    kinds = [type(t) for t in train_transform(32, flip=False).transforms]
    assert T.RandomHorizontalFlip not in kinds and T.RandomResizedCrop in kinds
    assert T.RandomHorizontalFlip in [type(t) for t in train_transform(32).transforms]
