"""Tests for albef.data.transforms against hand-computed expectations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

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
    return list(zip(ys.tolist(), xs.tolist()))


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
    assert out[2, 3, 0] == 0  # 10 + 1.36*(0-10) < 0 -> clipped


def test_autocontrast_and_equalize_stretch_to_full_range():
    a = np.full((64, 64, 3), 50, np.uint8)
    a[:, 32:] = 150
    aug = RandomAugment(1, 7)
    out = np.asarray(aug.apply_op(Image.fromarray(a), "AutoContrast"))
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
    aug, f, h, w = RandomAugment(1, 7), (-0.21 if negate else 0.21), 6, 10
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


def test_rotate_keeps_centre_and_turns_counter_clockwise():
    aug = RandomAugment(1, 7)
    out = aug.apply_op(_dot(9, 9, 4, 4), "Rotate")
    assert _white(out) == [(4, 4)]
    assert out.getpixel((0, 0)) == (128,) * 3  # corners rotate out of view
    # A pixel 4 right of centre, turned 21 degrees counter-clockwise, lands at
    # (4 - 4 sin 21, 4 + 4 cos 21) = (2.57, 7.73); nearest sampling may smear it
    # over neighbouring pixels, so allow one pixel of slack.
    dy, dx = 4 * math.sin(math.radians(21)), 4 * math.cos(math.radians(21))
    for negate, ey in ((False, 4 - dy), (True, 4 + dy)):
        hits = _white(aug.apply_op(_dot(9, 9, 4, 8), "Rotate", negate=negate))
        assert hits and all(abs(y - ey) < 1 and abs(x - 4 - dx) < 1 for y, x in hits)


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
