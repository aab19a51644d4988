"""Image transforms: PIL decode and crops for the loader workers, batched tensor ops for the device.

Worker side (one image, PIL, uint8 out): `load_rgb`, `random_resized_crop` (torchvision's
RandomResizedCrop semantics: same sampling of the box, 10 tries then a centre fallback),
`resize_center_crop` (torchvision's Resize(shorter side) + CenterCrop). Both resize with PIL's
bilinear or bicubic filter (`interpolation`), which torchvision's PIL path uses.
Device side (whole batch, no per-image Python loop): `cifar_augment` (pad 4 with zeros or by
reflection, random crop, horizontal flip as one gather), `normalize_to` (uint8 NHWC -> normalized
NCHW in the wanted dtype and memory format), `resize_uint8_batch` (the same filters as torch's
antialiased interpolate).
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError

EVAL_CROP_FRACTION = 0.875  # ImageNet-style eval default: the shorter side to size / 0.875, then a centre crop
# The resampling filters by their config name (config.sections.INTERPOLATIONS). PIL always
# antialiases (its filter widens with the downscale); torch does with antialias=True, to within
# rounding of PIL's result (tests/tolerances.py RESAMPLED_LEVELS).
PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


# ----------------------------------------------------------------------------- worker side (PIL)

def load_rgb(path: str) -> Image.Image:
    """Decode any supported file to an upright RGB image (grayscale, 16-bit grayscale, CMYK,
    palette, alpha, EXIF)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF, not pixels
            if img.mode.startswith("I"):  # 16-bit grayscale: convert() would clip at 255, not scale
                img = Image.fromarray(_to_8bit(np.asarray(img)))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # converting a transparent palette directly warns
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "palette images with transparency"
                return img.convert("RGB")
    except Image.DecompressionBombError as e:  # an Exception, not an OSError: refused before decoding
        raise DataError(f"cannot decode image {path}: {_too_large(e)}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for undecodable files
        raise DataError(f"cannot decode image {path}: {e}") from None


def _to_8bit(levels: np.ndarray) -> np.ndarray:
    """16-bit levels (0..65535) as uint8, round(v / 257): what DALI's decoder makes of them."""
    return np.rint(np.clip(levels, 0, 65535) / 257.0).astype(np.uint8)


def _too_large(error: Exception) -> str:
    """Pillow's refusal of a decompression bomb in one line, with the limit it applied."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1))} pixels" if found else "its size"
    return (f"too large: {size}, over the {2 * Image.MAX_IMAGE_PIXELS} pixels Pillow decodes "
            "(twice PIL.Image.MAX_IMAGE_PIXELS)")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box, drawn as torchvision draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest centred box whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, flip: bool = True,
                        interpolation: str = "bilinear") -> np.ndarray:
    """RandomResizedCrop(size) with the `interpolation` filter + random horizontal flip, as a uint8 HWC array."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
    # resize(box=...) crops and resizes in one pass, without materialising the crop.
    out = img.resize((size, size), PIL_FILTERS[interpolation], box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def resize_center_crop(img: Image.Image, size: int, resize_to: int | None = None,
                       interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to `resize_to` (default size) with the `interpolation` filter,
    centre-crop size x size; uint8 HWC."""
    resize_to = size if resize_to is None else resize_to
    w, h = img.size
    if (w, h) != (resize_to, resize_to) or resize_to != size:
        if w <= h:
            nw, nh = resize_to, int(resize_to * h / w)
        else:
            nw, nh = int(resize_to * w / h), resize_to
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), PIL_FILTERS[interpolation])
        left = int(round((nw - size) / 2.0))
        top = int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def eval_resize_for(size: int, aug: str, crop_pct: float | None = None) -> int:
    """Shorter-side length before the eval centre crop: int(size / crop_pct); by default crop_pct
    is 0.875 for ImageNet-style aug and 1 (the training size, no zoom) for CIFAR-style."""
    if crop_pct is None:
        crop_pct = EVAL_CROP_FRACTION if aug == "imagenet" else 1.0
    return int(size / crop_pct)


# ----------------------------------------------------------------------------- device side (batched)

def draw_cifar_params(n: int, size: int, generator: torch.Generator, pad: int = 4):
    """(dy, dx, flip) for n images: crop offsets in [0, 2*pad] and flip flags, on the CPU."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


def cifar_augment(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4,
                  padding_mode: str = "zeros") -> torch.Tensor:
    """Pad by `pad`, crop H x W at (dy, dx), flip where `flip`: the whole batch in one gather.

    images: (N, H, W, C) uint8 NHWC; dy, dx: (N,) int64 in [0, 2*pad]; flip: (N,) bool.
    padding_mode: 'zeros' (black border) or 'reflect' (the image mirrored about its edge pixel,
    which is not repeated: torchvision's RandomCrop(padding_mode='reflect'); needs pad < H, W).
    Output pixel (i, j) of image n is padded[n, dy + i, dx + (W-1-j if flip else j)].
    """
    n, h, w, _ = images.shape
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy.to(images.device)[:, None] + ar_h  # (N, H)
    cols_src = torch.where(flip.to(images.device)[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    cols = dx.to(images.device)[:, None] + cols_src
    batch = torch.arange(n, device=images.device)[:, None, None]
    if padding_mode == "reflect":  # read the mirrored pixel of the image itself: no padded copy
        rows, cols = _reflect(rows - pad, h), _reflect(cols - pad, w)
        return images[batch, rows[:, :, None], cols[:, None, :]]
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))  # pads W and H, not C
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    """Indices in (-length, 2 * length - 1) mirrored into [0, length) without repeating the edge."""
    index = index.abs()
    return torch.where(index > length - 1, 2 * (length - 1) - index, index)


def normalize_to(images_nhwc: torch.Tensor, mean: torch.Tensor, std_inv: torch.Tensor,
                 dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> (x/255 - mean)/std as NCHW in `dtype`; channels_last is the free NHWC view.

    mean and std_inv are (1, 3, 1, 1) float32 tensors already scaled for 0..255 input.
    """
    x = images_nhwc.permute(0, 3, 1, 2)  # a view: NCHW shape, channels_last strides
    x = ((x.float() - mean) * std_inv).to(dtype)  # elementwise ops keep the channels_last strides
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def norm_constants(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean*255, 1/(std*255)) as (1, 3, 1, 1) float32 on device, for uint8 input."""
    m = torch.tensor([v * 255.0 for v in mean], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor([1.0 / (v * 255.0) for v in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, s


def resize_uint8_batch(images_nhwc: torch.Tensor, size: int, interpolation: str = "bilinear",
                       chunk: int = 4096) -> torch.Tensor:
    """Resize in-memory uint8 NHWC images (e.g. CIFAR arrays) to size x size with the
    `interpolation` filter (bilinear or bicubic), antialiased as PIL."""
    if images_nhwc.shape[1] == size and images_nhwc.shape[2] == size:
        return images_nhwc
    out = []
    for part in images_nhwc.split(chunk):  # chunks bound the float32 temporary
        x = part.permute(0, 3, 1, 2).float()
        if interpolation == "bicubic":
            # Bicubic overshoots past 0..255 at hard edges; PIL resizes the width, then the height,
            # rounding and clipping to uint8 in between: so do we (one pass is up to ~20 levels
            # off PIL's result at such pixels, these two within 1).
            x = _interpolate_uint8(x, (x.shape[2], size), interpolation)
        out.append(_interpolate_uint8(x, (size, size), interpolation).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return torch.cat(out)


def _interpolate_uint8(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased F.interpolate of float NCHW levels to `size`, rounded and clipped to 0..255."""
    x = torch.nn.functional.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255)
