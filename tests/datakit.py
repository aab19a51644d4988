"""Tiny image folders and in-memory datasets shared by the data tests, and a loader over fixed batches."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from automix_fast.data import DataSpec


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(32, 32), splits=("train", "val")) -> str:
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rgb(size[1], size[0], c * 100 + i)).save(root / split / name / f"{i}.jpg", quality=90)
    return str(root)


def folder_spec(root, **kw) -> DataSpec:
    kw.setdefault("batch_size", 2)
    kw.setdefault("workers", 0)  # tests must not fork workers: the cores are shared
    return DataSpec(dataset="auto", data_dir=str(root), **kw)


def expected_cifar(images, idx, dy, dx, flip, pad=4, padding_mode="zeros"):
    """The augmentation written per image, the slow obvious way: torch's own pad (constant 0, or
    mode='reflect' as torchvision's RandomCrop(padding_mode='reflect')), then the crop, then the flip."""
    out = []
    mode = {"zeros": "constant", "reflect": "reflect"}[padding_mode]
    for i, j in enumerate(idx):
        chw = torch.from_numpy(np.ascontiguousarray(images[j])).permute(2, 0, 1)[None].float()
        p = torch.nn.functional.pad(chw, (pad, pad, pad, pad), mode=mode)[0].permute(1, 2, 0).to(torch.uint8).numpy()
        h, w = images.shape[1:3]
        crop = p[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop[:, ::-1] if flip[i] else crop)
    return np.stack(out)


def exif_rotated(path):
    """40 wide x 20 high, left half red, right half blue, tagged 'rotate 90 CW to display'."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)


class BatchList:
    """A training loader over a fixed list of (x, y) batches: what train_one_epoch asks of one."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
