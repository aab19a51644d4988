"""The embedded default dataset: procedural 32x32 shape images, generated once as real JPEGs.

With no data directory the engine still trains on something real: 10 classes of shapes
(disc, ring, square, triangle, cross, stripes, checker, star, two_dots, crescent) drawn with a
random colour, position, scale and rotation over a cluttered background (colour gradient,
low-frequency blotches, random lines), with smaller distractor shapes of any class, sensor
noise, and JPEG compression. Neighbouring classes differ in small details at 32 px (disc /
ring / crescent, square / checker, cross / star), some images have little contrast, and a
distractor may overlap the main shape, so a small CNN learns it well but not perfectly and
mixing policies have room to differ.

Layout: `<cache>/automix-fast-embedded-v1/{train,val}/<class>/NNNNN.jpg` (an ImageFolder).
Every image has its own numpy generator seeded by (SEED, split, class, index), so the bytes are
the same on every machine with the same Pillow/libjpeg and a smaller count is a prefix of the
full set. The cache is `$AUTOMIX_FAST_CACHE`, else `~/.cache/automix-fast`. Generation writes
into a uniquely named temporary folder next to the final one and renames it into place, so a
crashed or concurrent generation never leaves a half-written dataset under the final name;
a second call (or a second rank) reuses what is there.
"""
from __future__ import annotations

import functools
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

NAME = "automix-fast-embedded-v1"
CLASSES = ["disc", "ring", "square", "triangle", "cross", "stripes", "checker", "star", "two_dots", "crescent"]
TRAIN_PER_CLASS = 500
VAL_PER_CLASS = 100
IMAGE_SIZE = 32
JPEG_QUALITY = 90
SEED = 20220323  # fixed forever for v1: changing anything that alters pixels means a new NAME

_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-downsampled: anti-aliased edges
_SPLIT_IDS = {"train": 0, "val": 1}


def default_cache_dir() -> str:
    return os.environ.get("AUTOMIX_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "automix-fast")


# ----------------------------------------------------------------------------- shapes

def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Coverage (bool) of shape `kind` in its own frame, where the shape spans about the unit disc."""
    r2 = u * u + v * v
    name = CLASSES[kind]
    if name == "disc":
        return r2 < 1.0
    if name == "ring":
        inner = rng.uniform(0.45, 0.65)
        return (r2 < 1.0) & (r2 > inner * inner)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if name == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes at 120 degrees: an equilateral triangle
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) < 0.5
        return inside
    if name == "cross":
        arm = rng.uniform(0.22, 0.32)
        return ((np.abs(u) < arm) & (np.abs(v) < 0.95)) | ((np.abs(v) < arm) & (np.abs(u) < 0.95))
    if name == "stripes":
        period = rng.uniform(0.55, 0.75)
        return (r2 < 1.0) & (np.sin(u * (2 * np.pi / period)) > 0)
    if name == "checker":
        cells = (np.floor((u + 0.8) * 2.5) + np.floor((v + 0.8) * 2.5)) % 2 == 0
        return (np.maximum(np.abs(u), np.abs(v)) < 0.8) & cells
    if name == "star":
        phi = np.arctan2(v, u)
        edge = 0.4 + 0.6 * ((np.cos(5 * phi) + 1) / 2) ** 1.5
        return r2 < edge * edge
    if name == "two_dots":
        d = rng.uniform(0.5, 0.6)
        return ((u - d) ** 2 + v * v < 0.16) | ((u + d) ** 2 + v * v < 0.16)
    if name == "crescent":
        off = rng.uniform(0.35, 0.55)
        return (r2 < 1.0) & ((u - off) ** 2 + v * v > 0.8 ** 2)
    raise ValueError(kind)


def _paint_shape(img, xs, ys, kind, cx, cy, scale, angle, colour, rng, alpha=1.0) -> None:
    """Draw shape `kind` centred at (cx, cy) with radius `scale` (image spans -1..1) into img."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xs - cx, ys - cy
    u = (c * dx + s * dy) / scale  # rotate the pixel grid into the shape's frame
    v = (-s * dx + c * dy) / scale
    mask = _shape_mask(kind, u, v, rng).astype(np.float32)[..., None] * alpha
    # A gently varying fill: flat colour would let the net key on perfectly uniform regions.
    shade = 1.0 + rng.uniform(-0.25, 0.25) * u[..., None].clip(-1, 1)
    img *= 1.0 - mask
    img += mask * np.clip(colour * shade, 0, 255)


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in -1..1 (xs, ys) and a (n, 4) bilinear upsampling matrix."""
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    xs, ys = np.meshgrid(coords, coords)
    pos = np.clip((coords + 1) / 2 * 4 - 0.5, 0, 3)  # sample positions on a 4-point coarse grid
    up = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(4, dtype=np.float32)[None, :]))
    return xs, ys, up


def _background(rng, xs, ys, up) -> np.ndarray:
    """Colour gradient + coarse random blotches + a few thin random lines."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * xs + np.sin(angle) * ys) + 1.5) / 3.0
    img = c0 + (c1 - c0) * t[..., None]
    coarse = rng.normal(0, rng.uniform(5, 30), (3, 4, 4)).astype(np.float32)
    img += (up @ coarse @ up.T).transpose(1, 2, 0)  # bilinear upsampling of the blotches
    for _ in range(rng.integers(0, 4)):
        a, off = rng.uniform(0, np.pi), rng.uniform(-1, 1)
        dist = np.abs(np.cos(a) * xs + np.sin(a) * ys - off)
        line = (dist < rng.uniform(0.02, 0.05)).astype(np.float32)[..., None]
        img = img * (1 - line) + line * rng.uniform(0, 255, 3)
    return img.astype(np.float32)


def _contrasting_colour(rng, background: np.ndarray) -> np.ndarray:
    """A random colour, redrawn a few times when too close to the local background."""
    want = rng.uniform(30, 110)  # sometimes low contrast: not every image should be easy
    colour = rng.uniform(0, 255, 3)
    for _ in range(8):
        if np.linalg.norm(colour - background) >= want:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def render_image(kind: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One uint8 (size, size, 3) image of class `kind`, fully determined by rng."""
    n = size * _SUPERSAMPLE
    xs, ys, up = _grid(n)
    img = _background(rng, xs, ys, up)
    # Distractors: smaller shapes of any class; the labelled shape is always the largest.
    n_distract = rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])
    main_scale = rng.uniform(0.38, 0.62)
    cx, cy = rng.uniform(-0.5, 0.5, 2)
    behind = rng.integers(0, n_distract + 1)  # some distractors are drawn over the main shape
    for i in range(n_distract + 1):
        if i == behind:
            local = img[int((cy + 1) / 2 * (n - 1)), int((cx + 1) / 2 * (n - 1))]
            _paint_shape(img, xs, ys, kind, cx, cy, main_scale, rng.uniform(0, 2 * np.pi),
                         _contrasting_colour(rng, local), rng)
        else:
            d_kind = int(rng.integers(0, len(CLASSES)))
            d_scale = main_scale * rng.uniform(0.3, 0.55)
            dx, dy = rng.uniform(-0.85, 0.85, 2)
            _paint_shape(img, xs, ys, d_kind, dx, dy, d_scale, rng.uniform(0, 2 * np.pi),
                         rng.uniform(0, 255, 3), rng, alpha=rng.uniform(0.5, 1.0))
    # Box-downsample the supersampled image (anti-aliased edges), then add sensor noise.
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files

def _image_rng(split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, _SPLIT_IDS[split], kind, index])


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_class(root: str, split: str, kind: int, count: int) -> None:
    """Render one class folder; writing thousands of tiny files is I/O-bound, so threads do it."""
    folder = os.path.join(root, split, CLASSES[kind])
    os.makedirs(folder)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(render_image(kind, _image_rng(split, kind, i))).save(buf, format="JPEG", quality=JPEG_QUALITY)
            pending.append(pool.submit(_write_file, os.path.join(folder, f"{i:05d}.jpg"), buf.getvalue()))
        for f in pending:
            f.result()  # re-raise a failed write (disk full, ...) before the rename


def _generate(root: str, train_per_class: int, val_per_class: int) -> None:
    """All class folders, on up to 8 forked processes (rendering is CPU-bound numpy)."""
    jobs = [(root, split, kind, n) for split, n in (("train", train_per_class), ("val", val_per_class))
            for kind in range(len(CLASSES))]
    procs = min(8, os.cpu_count() or 1)
    # fork: children start at once and inherit the imports (spawn would re-import torch per child).
    # Tiny sets (tests) are not worth the processes.
    if procs > 1 and sys.platform == "linux" and train_per_class + val_per_class >= 50:
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
            for _ in pool.map(_write_class, *zip(*jobs)):
                pass
    else:
        for job in jobs:
            _write_class(*job)


def dataset_dir_name(train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS) -> str:
    """Folder name; non-default counts get their own name so they never pose as the full set."""
    if (train_per_class, val_per_class) == (TRAIN_PER_CLASS, VAL_PER_CLASS):
        return NAME
    return f"{NAME}-n{train_per_class}-{val_per_class}"


def ensure_embedded_dataset(cache_dir: str | None = None, train_per_class: int = TRAIN_PER_CLASS,
                            val_per_class: int = VAL_PER_CLASS) -> str:
    """Path of the embedded dataset (ImageFolder root with train/ and val/), generating it once."""
    cache_dir = cache_dir or default_cache_dir()
    final = os.path.join(cache_dir, dataset_dir_name(train_per_class, val_per_class))
    if os.path.isdir(final):  # only ever created by the rename below, so it is complete
        return final
    os.makedirs(cache_dir, exist_ok=True)
    # Same parent as `final`, so the rename is atomic; the leading dot and unique suffix keep a
    # crashed run's leftovers from ever being mistaken for the dataset.
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=cache_dir)
    try:
        _generate(tmp, train_per_class, val_per_class)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race with another process: a real error
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
