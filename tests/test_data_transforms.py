"""data/transforms.py: the CIFAR augmentation, RandomResizedCrop boxes, resize + center crop, and
EXIF orientation."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from automix_fast.data.transforms import (cifar_augment, draw_cifar_params, load_rgb, random_resized_crop_box,
                                          resize_center_crop)
from datakit import exif_rotated, expected_cifar, rgb


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
