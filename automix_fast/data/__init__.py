"""Data: datasets (image folders, CIFAR batches, the embedded default) and their loaders.

`build_loaders(spec)` returns (train_loader, val_loader, info); see docs/INTERNALS.md for the
loader contract. The DALI loaders live in `automix_fast.data.dali` and are imported only when
asked for, so the package works where DALI is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataSpec:
    """Everything a loader needs to know; built by the CLI from the resolved config."""

    dataset: str = "auto"  # auto | embedded | folder | cifar10 | cifar100
    data_dir: str | None = None
    img_size: int = 32
    batch_size: int = 64  # per rank
    eval_batch_size: int = 256
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # dtype of the emitted images
    loader: str = "torch"  # torch | dali
    aug: str = "auto"  # auto | cifar | imagenet
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    skip_bad_images: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class DatasetInfo:
    """A resolved dataset: file lists for folders, arrays for in-memory data."""

    kind: str  # folder | cifar10 | cifar100 | embedded
    root: str
    classes: list[str]
    train_samples: list[tuple[str, int]] | None = None
    val_samples: list[tuple[str, int]] | None = None
    train_arrays: tuple | None = None  # (uint8 NHWC ndarray, int64 ndarray)
    val_arrays: tuple | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_samples) if self.train_samples is not None else len(self.train_arrays[1])

    @property
    def num_val(self) -> int:
        return len(self.val_samples) if self.val_samples is not None else len(self.val_arrays[1])
