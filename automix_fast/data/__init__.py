"""Data: datasets (image folders, CIFAR batches, the embedded default) and their loaders.

`build_loaders(spec)` returns (train_loader, val_loader, info); see docs/INTERNALS.md for the
loader contract. `resolve_dataset(spec)` finds the data (auto-detecting CIFAR batches, an image
folder, or the embedded default when there is no data_dir) and applies the bad-file policy of
`automix_fast.data.folder` before any loader is built. The DALI loaders live in
`automix_fast.data.dali`, which imports DALI itself only when asked for, so the package works
where DALI is not installed. What a data directory holds is told apart in `layout.py`;
`DataSpec` and `DatasetInfo` live in `spec.py`.
"""
from __future__ import annotations

from ..errors import DataError
from .bad_files import BadFiles
from .cifar import load_cifar
from .dali import build_dali_loaders
from .embedded import ensure_embedded_dataset
from .folder import resolve_image_folder
from .layout import detect_dataset
from .spec import (AUGS, DATASETS, IMAGE_DTYPES, IMAGENET_MEAN, IMAGENET_STD, LOADERS, DatasetInfo,  # noqa: F401
                   DataSpec, validate_spec, view_options)
from .subset import apply_train_subset
from .torch_loader import build_torch_loaders


def resolve_dataset(spec: DataSpec) -> DatasetInfo:
    """Find and check the data. dataset 'auto': no data_dir -> embedded; a dir that contains or is
    cifar-10-batches-py / cifar-100-python -> cifar10 / cifar100; an image folder in one of
    layout.LAYOUTS -> folder (one without val/ or test/ needs spec.val_split). 'embedded' uses
    data_dir, when given, as the cache directory."""
    kind = detect_dataset(spec.data_dir) if spec.dataset == "auto" else spec.dataset
    if kind == "embedded":
        cache = spec.data_dir if spec.dataset == "embedded" else None
        return resolve_image_folder(ensure_embedded_dataset(cache), spec.skip_bad_images, "embedded", spec.val_split)
    if kind in ("cifar10", "cifar100"):
        if spec.val_split is not None:
            raise DataError(f"--val-split {spec.val_split:g} holds out part of a folder without a validation split, "
                            f"but {kind} has its test batch: drop --val-split")
        return load_cifar(spec.data_dir, kind)
    return resolve_image_folder(spec.data_dir, spec.skip_bad_images, val_split=spec.val_split)


def build_loaders(spec: DataSpec):
    """(train_loader, val_loader, info): validate the spec, resolve the data, build the loaders."""
    validate_spec(spec)
    info = resolve_dataset(spec)
    apply_train_subset(info, spec.train_subset, spec.train_subset_seed)  # before the loaders and bad-file lists
    info.bad_files = BadFiles(skip=spec.skip_bad_images, announce=spec.rank == 0)
    info.bad_files.add_screened(info.screened_out)  # listed in the run folder from the first epoch's end
    if info.train_samples is not None:
        info.bad_files.dataset_paths = {p for p, _ in info.train_samples} | {p for p, _ in info.val_samples}
    if spec.loader == "dali":
        train, val = build_dali_loaders(spec, info)
    else:
        train, val = build_torch_loaders(spec, info)
    return train, val, info
