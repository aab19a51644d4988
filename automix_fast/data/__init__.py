"""Data: datasets (image folders, CIFAR batches, the embedded default) and their loaders.

`build_loaders(spec)` returns (train_loader, val_loader, info); see docs/INTERNALS.md for the
loader contract. `resolve_dataset(spec)` finds the data (auto-detecting CIFAR batches, an image
folder, or the embedded default when there is no data_dir) and applies the bad-file policy of
`automix_fast.data.folder` before any loader is built. The DALI loaders live in `automix_fast.data.dali` and are imported only when
asked for, so the package works where DALI is not installed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config.sections import AUGS, DATASETS
from ..errors import ConfigError, DataError

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
    train_subset: float | None = None  # a class-balanced fraction of the training set (data/subset.py)
    train_subset_seed: int = 0
    val_split: float | None = None  # hold out this class-balanced part of a folder without val/ (data/subset.py)
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
    bad_files: object = None  # bad_files.BadFiles: files that failed to decode mid-run (build_loaders sets it)
    screened_out: list = field(default_factory=list)  # (path, problem) dropped by --skip-bad-images before training

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_samples) if self.train_samples is not None else len(self.train_arrays[1])

    @property
    def num_val(self) -> int:
        return len(self.val_samples) if self.val_samples is not None else len(self.val_arrays[1])


LOADERS = ("torch", "dali")  # as resolved (the config's "auto" is not one)
IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_spec(spec: DataSpec) -> None:
    """ConfigError naming the first bad field; normalises spec.device to a torch.device."""
    _require(spec.dataset in DATASETS, f"dataset: unknown '{spec.dataset}'; choose from {', '.join(DATASETS)}")
    _require(spec.loader in LOADERS, f"loader: unknown '{spec.loader}'; choose from {', '.join(LOADERS)}")
    _require(spec.aug in AUGS, f"aug: unknown '{spec.aug}'; choose from {', '.join(AUGS)}")
    for name, low in (("img_size", 8), ("batch_size", 1), ("eval_batch_size", 1), ("workers", 0), ("world_size", 1)):
        value = getattr(spec, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                 f"{name}: must be an integer >= {low}, got {value!r}")
    _require(isinstance(spec.rank, int) and 0 <= spec.rank < spec.world_size,
             f"rank: must be in 0..{spec.world_size - 1}, got {spec.rank!r}")
    _require(spec.dtype in IMAGE_DTYPES, f"dtype: images must be float32, bfloat16 or float16, got {spec.dtype}")
    _require(len(spec.mean) == 3 and len(spec.std) == 3 and all(s > 0 for s in spec.std),
             f"mean/std: need 3 values each and std > 0, got mean={spec.mean} std={spec.std}")
    _require(spec.train_subset is None or 0 < spec.train_subset <= 1,
             f"train_subset: must be a fraction in (0, 1], got {spec.train_subset!r}")
    _require(spec.val_split is None or 0 < spec.val_split < 1,
             f"val_split: must be a fraction in (0, 1), got {spec.val_split!r}")
    _require(spec.dataset in ("auto", "embedded") or spec.data_dir is not None,
             f"data_dir: dataset '{spec.dataset}' needs a data directory")
    try:
        spec.device = torch.device(spec.device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: {e}") from None


def detect_dataset(data_dir: str | None) -> str:
    """The dataset kind 'auto' means for data_dir (see resolve_dataset)."""
    from .cifar import find_cifar_dir
    from .folder import LAYOUTS, is_image_folder_root

    if data_dir is None:
        return "embedded"
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    for kind in ("cifar10", "cifar100"):
        if find_cifar_dir(data_dir, kind) is not None:
            return kind
    if is_image_folder_root(data_dir):
        return "folder"
    raise DataError(f"cannot tell what dataset {data_dir} holds; accepted layouts: {LAYOUTS}")


def resolve_dataset(spec: DataSpec) -> DatasetInfo:
    """Find and check the data. dataset 'auto': no data_dir -> embedded; a dir that contains or is
    cifar-10-batches-py / cifar-100-python -> cifar10 / cifar100; an image folder in one of
    folder.LAYOUTS -> folder (one without val/ or test/ needs spec.val_split). 'embedded' uses
    data_dir, when given, as the cache directory."""
    from .folder import resolve_image_folder

    kind = detect_dataset(spec.data_dir) if spec.dataset == "auto" else spec.dataset
    if kind == "embedded":
        from .embedded import ensure_embedded_dataset

        cache = spec.data_dir if spec.dataset == "embedded" else None
        return resolve_image_folder(ensure_embedded_dataset(cache), spec.skip_bad_images, "embedded", spec.val_split)
    if kind in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        if spec.val_split is not None:
            raise DataError(f"--val-split {spec.val_split:g} holds out part of a folder without a validation split, "
                            f"but {kind} has its test batch: drop --val-split")
        return load_cifar(spec.data_dir, kind)
    return resolve_image_folder(spec.data_dir, spec.skip_bad_images, val_split=spec.val_split)


def build_loaders(spec: DataSpec):
    """(train_loader, val_loader, info): validate the spec, resolve the data, build the loaders."""
    from .bad_files import BadFiles

    from .subset import apply_train_subset

    validate_spec(spec)
    info = resolve_dataset(spec)
    apply_train_subset(info, spec.train_subset, spec.train_subset_seed)  # before the loaders and bad-file lists
    info.bad_files = BadFiles(skip=spec.skip_bad_images, announce=spec.rank == 0)
    info.bad_files.add_screened(info.screened_out)  # listed in the run folder from the first epoch's end
    if info.train_samples is not None:
        info.bad_files.dataset_paths = {p for p, _ in info.train_samples} | {p for p, _ in info.val_samples}
    if spec.loader == "dali":
        from .dali import build_dali_loaders  # imported only here: DALI is an optional extra

        train, val = build_dali_loaders(spec, info)
    else:
        from .torch_loader import build_torch_loaders

        train, val = build_torch_loaders(spec, info)
    return train, val, info
