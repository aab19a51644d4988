"""data/transforms.py: the CIFAR augmentation, RandomResizedCrop boxes, resize + center crop, the
resampling filters, and EXIF orientation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from automix_fast.data.transforms import (PIL_FILTERS, cifar_augment, draw_cifar_params, load_rgb,
                                          random_resized_crop, random_resized_crop_box, resize_center_crop,
                                          resize_uint8_batch)
from datakit import exif_rotated, expected_cifar, rgb, waves
from tolerances import RESAMPLED_LEVELS, assert_resampled_like

OTHER_FILTER = {"bilinear": "bicubic", "bicubic": "bilinear"}


def test_cifar_augment_matches_per_image():
    x = torch.from_numpy(rgb(5 * 9, 7, 0).reshape(5, 9, 7, 3).copy())  # non-square on purpose
    dy, dx, flip = draw_cifar_params(5, 9, torch.Generator().manual_seed(3))
    got = cifar_augment(x, dy, dx, flip).numpy()
    np.testing.assert_array_equal(got, expected_cifar(x.numpy(), range(5), dy.numpy(), dx.numpy(), flip.numpy()))


def test_cifar_augment_reflect_is_torch_reflect_pad_then_crop():
    """Every offset, both flips, non-square images: the gather reads torch's reflect padding."""
    n, h, w = 2 * 9 * 9, 9, 7
    x = torch.from_numpy(rgb(n * h, w, 1).reshape(n, h, w, 3).copy())
    offsets = torch.arange(9)
    dy = offsets.repeat_interleave(18)
    dx = offsets.repeat_interleave(2).repeat(9)
    flip = torch.tensor([False, True]).repeat(81)
    got = cifar_augment(x, dy, dx, flip, padding_mode="reflect").numpy()
    want = expected_cifar(x.numpy(), range(n), dy.numpy(), dx.numpy(), flip.numpy(), padding_mode="reflect")
    np.testing.assert_array_equal(got, want)
    zeros = cifar_augment(x, dy, dx, flip).numpy()
    assert not np.array_equal(got, zeros) and np.array_equal(got[80], zeros[80])  # offset (4, 4): no border


def test_load_rgb_applies_exif_orientation(tmp_path):
    exif_rotated(tmp_path / "e.jpg")
    img = np.asarray(load_rgb(str(tmp_path / "e.jpg")))
    assert img.shape == (40, 20, 3)
    assert img[5, 10, 0] > 200 and img[35, 10, 2] > 200  # the left (red) half is now on top


def test_random_resized_crop_box_semantics():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 80, rng)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
    assert random_resized_crop_box(1000, 10, rng, scale=(0.9, 1.0)) == (493, 0, 13, 10)  # fallback: centre


def test_resize_center_crop_shapes():
    img = Image.fromarray(rgb(50, 100, 0))
    assert resize_center_crop(img, 32).shape == (32, 32, 3)
    assert resize_center_crop(img, 32, resize_to=36).shape == (32, 32, 3)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_worker_resizes_are_pils_with_the_asked_filter(interpolation):
    """The random-resized crop and the resize before the centre crop are PIL's resize of the same
    box with the asked filter (torchvision's PIL path, interpolation=2 or 3), to the pixel."""
    img = Image.fromarray(waves(57, 71, 0))
    want_filter = PIL_FILTERS[interpolation]
    for seed in range(5):
        left, top, w, h = random_resized_crop_box(71, 57, np.random.default_rng(seed))
        want = np.asarray(img.resize((24, 24), want_filter, box=(left, top, left + w, top + h)))
        got = random_resized_crop(img, 24, np.random.default_rng(seed), flip=False, interpolation=interpolation)
        np.testing.assert_array_equal(got, want)
    # shorter side 57 -> 28, longer int(28 * 71 / 57) = 34; crop 24 at (round(5), round(2))
    want = np.asarray(img.resize((34, 28), want_filter))[2:26, 5:29]
    np.testing.assert_array_equal(resize_center_crop(img, 24, 28, interpolation=interpolation), want)
    other = resize_center_crop(img, 24, 28, interpolation=OTHER_FILTER[interpolation])
    assert np.abs(other.astype(int) - want).mean() > RESAMPLED_LEVELS["mean"]  # the filters are told apart


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("h, w, size", [(24, 24, 32), (48, 48, 32), (64, 64, 24), (17, 45, 40)])
def test_device_resize_is_pils_within_resampling_tolerance(interpolation, h, w, size):
    """resize_uint8_batch (torch's antialiased interpolate) against PIL's resize with the same
    filter, image by image; the other filter is out of that tolerance."""
    batch = np.stack([waves(h, w, seed) for seed in range(3)])
    got = resize_uint8_batch(torch.from_numpy(batch), size, interpolation).numpy()
    for i, image in enumerate(batch):
        want = np.asarray(Image.fromarray(image).resize((size, size), PIL_FILTERS[interpolation]))
        assert_resampled_like(got[i], want, f"{interpolation} {w}x{h} -> {size}, image {i}")
        other = np.asarray(Image.fromarray(image).resize((size, size), PIL_FILTERS[OTHER_FILTER[interpolation]]))
        assert np.abs(got[i].astype(int) - other).mean() > RESAMPLED_LEVELS["mean"]


def gray16(path, seed: int = 0) -> np.ndarray:
    """A 16-bit grayscale PNG of random levels over the whole range (opens as mode I;16); returns them."""
    levels = np.random.default_rng(seed).integers(0, 65536, (20, 24), dtype=np.uint16)
    levels[0, :6] = [0, 128, 129, 385, 65406, 65535]  # either side of the rounding points
    Image.fromarray(levels).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    return levels


def test_load_rgb_scales_16_bit_grayscale_to_8_bits(tmp_path):
    """Scaled as round(v / 257), not clipped at 255 (which made such images almost white)."""
    levels = gray16(tmp_path / "g16.png")
    img = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert img.shape == (20, 24, 3) and (img == img[..., :1]).all()
    np.testing.assert_array_equal(img[..., 0], np.rint(levels / 257.0).astype(np.uint8))
    assert img[0, :6, 0].tolist() == [0, 0, 1, 1, 254, 255]
