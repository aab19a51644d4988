"""Evaluation data alone: one split of a dataset and its loader, with no train/ folder read
and no train loader built (`automix-fast eval`, `visualize`).

Where the images are, for `data_dir`:
  - CIFAR python batches (`cifar-10-batches-py` / `cifar-100-python`): the test batch;
  - `DIR/val/` (or `DIR/test/` when there is no val/), with or without a `DIR/train/` beside it;
  - otherwise DIR itself as a flat ImageFolder, `DIR/<class>/<images>`;
  - with `val_split` (a run trained on a folder without val/): the part held out for validation;
  - no data_dir: the embedded dataset's val/ split.
"""
from __future__ import annotations

import os

from . import DataSpec, DatasetInfo, resolve_dataset, validate_spec
from ..errors import DataError
from .bad_files import BadFiles
from .cifar import load_cifar
from .dali import DaliFolderLoader, require_dali, screen_jpeg_headers
from .embedded import ensure_embedded_dataset
from .folder import scan_image_folder
from .layout import detect_dataset, val_split_name
from .torch_loader import (_resident_pair, _streaming, decode_folder, eval_crop_is_whole, folder_fits_resident,
                           resolve_aug)


def eval_split_dir(data_dir: str) -> str:
    """The folder of class folders to evaluate on (see the module docstring)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    split = os.path.join(data_dir, val_split_name(data_dir))
    return split if os.path.isdir(split) else data_dir


def resolve_eval_data(data_dir: str | None, dataset: str = "auto", skip_bad: bool = False,
                      val_split: float | None = None) -> DatasetInfo:
    """A DatasetInfo whose val split is the evaluation data and whose train split is empty."""
    if val_split is not None:  # the training folder's held-out part, drawn as training drew it
        info = resolve_dataset(DataSpec(dataset=dataset, data_dir=data_dir, skip_bad_images=skip_bad, val_split=val_split))
        info.train_samples = []
        return info

    kind = dataset
    if kind == "auto":
        kind = "embedded" if data_dir is None else None
    if kind is None:
        try:
            kind = detect_dataset(data_dir)
        except DataError:
            kind = "folder"  # not a train/val tree: a val/ folder alone or a flat ImageFolder
    if kind in ("cifar10", "cifar100"):
        info = load_cifar(data_dir, kind)
        info.train_arrays = (info.train_arrays[0][:0], info.train_arrays[1][:0])  # not needed here
        return info
    if kind == "embedded":
        root = os.path.join(ensure_embedded_dataset(data_dir if dataset == "embedded" else None), "val")
    else:
        root = eval_split_dir(data_dir)
    classes, samples = scan_image_folder(root, skip_bad)
    return DatasetInfo(kind=kind, root=root, classes=classes, train_samples=[], val_samples=samples)


def build_eval_loader(spec, info: DatasetInfo):
    """The val loader that `build_loaders(spec)` would build for `info`, alone. Files no decoder
    reads are left out of the evaluation and listed in `info.bad_files` (bad_files.py); with the
    DALI loader, JPEG headers are screened first, as for training (jpeg_header.py)."""
    validate_spec(spec)
    aug = resolve_aug(spec)
    if info.bad_files is None:
        info.bad_files = BadFiles(skip=spec.skip_bad_images, announce=spec.rank == 0, evaluating=True)
    if spec.loader == "dali" and info.val_samples is not None:
        require_dali()
        screen_jpeg_headers([p for p, _ in info.val_samples], info.bad_files, threads=max(4, int(spec.workers)))
        return DaliFolderLoader(info.val_samples, spec, False, aug, info.bad_files)
    whole = eval_crop_is_whole(spec, aug)
    if whole and info.val_arrays is not None and aug == "cifar":
        return _resident_pair(info.val_arrays, spec, False, aug)
    if whole and info.val_samples is not None and folder_fits_resident(info, spec, aug):
        val = decode_folder(info.val_samples, spec.img_size, bad_files=info.bad_files, interpolation=spec.interpolation)
        return _resident_pair(val, spec, False, aug)
    return _streaming(info, spec, False, aug)
