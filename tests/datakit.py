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


# ----------------------------------------------------------------------------- resampling filters

def waves(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients, steep waves and pixel noise (uint8 HWC): images on which the bicubic and the
    bilinear resize differ by 1 to 3 levels on average, so a check can tell which filter ran."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([x * 255 / (w - 1), y * 255 / (h - 1),
                    127.5 + 100 * np.sin(2 * np.pi * x / 7) * np.cos(2 * np.pi * y / 5)], -1)
    img += np.random.default_rng(seed).normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_waves(folder, sizes) -> list[tuple[str, int]]:
    """PNG files of `waves` at each (w, h) of `sizes`; samples (path, index): a label names its file."""
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i, (w, h) in enumerate(sizes):
        path = os.path.join(str(folder), f"{i}_{w}x{h}.png")
        Image.fromarray(waves(h, w, i)).save(path)
        samples.append((path, i))
    return samples


def waves_info(samples) -> "DatasetInfo":
    """A folder dataset whose training and validation samples are both `samples`."""
    from automix_fast.data import DatasetInfo

    return DatasetInfo(kind="folder", root=os.path.dirname(samples[0][0]), classes=[str(i) for i, _ in enumerate(samples)],
                       train_samples=list(samples), val_samples=list(samples))


def pin_train_randomness(monkeypatch) -> None:
    """Both loaders' training augmentation without its randomness, the flips apart: the
    random-resized crop takes the whole image (for DALI's, of a square image: area 1, aspect 1)
    and the CIFAR crop is not shifted; DALI runs its CPU pipeline in this process."""
    from automix_fast.data import torch_loader, transforms

    draw = torch_loader.draw_cifar_params

    def unshifted(n, size, generator, pad=4):
        dy, dx, flip = draw(n, size, generator, pad)
        return dy.fill_(pad), dx.fill_(pad), flip

    monkeypatch.setattr(transforms, "random_resized_crop_box", lambda w, h, rng, **_: (0, 0, w, h))
    monkeypatch.setattr(torch_loader, "draw_cifar_params", unshifted)
    try:
        from automix_fast.data import dali, dali_pipelines
    except ImportError:  # no DALI: the torch loader alone
        return
    monkeypatch.setattr(dali_pipelines, "RANDOM_AREA", (1.0, 1.0))
    monkeypatch.setattr(dali_pipelines, "RANDOM_ASPECT_RATIO", (1.0, 1.0))
    monkeypatch.setattr(dali_pipelines, "CIFAR_PAD", 0)
    monkeypatch.setattr(dali, "ISOLATE_CPU", False)


def resized(path: str, size: int, aug: str, interpolation: str) -> np.ndarray:
    """PIL's view of a training image with the randomness pinned (`pin_train_randomness`): the
    whole image resized to size x size (imagenet aug), or its shorter side to size and a centre
    crop (cifar aug), with PIL's `interpolation` filter."""
    from automix_fast.data.transforms import PIL_FILTERS, resize_center_crop

    img = Image.open(path).convert("RGB")
    if aug == "imagenet":
        return np.asarray(img.resize((size, size), PIL_FILTERS[interpolation]))
    return resize_center_crop(img, size, interpolation=interpolation)


def batches_by_label(loader, mean, std) -> dict[int, np.ndarray]:
    """Each image of one epoch of `loader` as 0..255 levels (float HWC), by its label."""
    out = {}
    m = np.asarray(mean, np.float64) * 255
    s = np.asarray(std, np.float64) * 255
    for x, y in loader:
        nhwc = x.float().permute(0, 2, 3, 1).numpy().astype(np.float64) * s + m
        out.update(zip(y.tolist(), nhwc))
    return out


def unflipped(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """`got` (HWC) or its mirror image, whichever is nearer `ref`: a training flip undone."""
    mirrored = got[:, ::-1]
    return got if np.abs(got - ref).mean() <= np.abs(mirrored - ref).mean() else mirrored


# Training sets (aug, image sizes (w, h), crop_pct) for each path a training resize takes:
# square images for the whole-image random-resized crop (up- and downscaled), small ones for
# the resident CIFAR-style loader, larger ones for the streaming one (with an eval zoom that
# training must not take).
TRAIN_VIEWS = {
    "random-resized crop": ("imagenet", [(45, 45), (24, 24), (80, 80), (33, 33)], None),
    "resident cifar": ("cifar", [(45, 37), (37, 53), (64, 40), (50, 50)], None),
    "streaming cifar": ("cifar", [(101, 77), (77, 101), (150, 57), (66, 70)], 0.5),
}
