"""What a data directory holds: the accepted layouts, telling them apart (`detect_dataset`),
and the error that names what a folder holds when it is not the layout asked for.

Only names and folders are looked at here (no image is opened): `folder.py` reads image
folders and `cifar.py` CIFAR batches.
"""
from __future__ import annotations

import os

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR_DIRS = {"cifar10": CIFAR10_DIR, "cifar100": CIFAR100_DIR}

SPLITS = ("train", "val", "test")
LAYOUTS = ("DIR/train/<class>/ with DIR/val/<class>/ (or DIR/test/<class>/); "
           "cifar-10-batches-py/ or cifar-100-python/ (DIR itself or inside it); "
           "DIR/train/<class>/ alone or a flat DIR/<class>/ with --val-split FRACTION")

KIND_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "folder": "an image folder"}  # detect_dataset's kinds


class LayoutError(DataError):
    """data_dir is not the layout asked for (or not any layout); `found` names the dataset kind it
    holds instead (detect_dataset's answer), or is None."""

    def __init__(self, message: str, found: str | None = None):
        super().__init__(message)
        self.found = found


def layout_error(data_dir: str, head: str, tail: str = "") -> LayoutError:
    """LayoutError `head (it holds KIND)tail`, naming what detect_dataset finds in data_dir."""
    try:
        found = detect_dataset(data_dir)
    except DataError:
        found = None
    return LayoutError(f"{head}{f' (it holds {KIND_NAMES[found]})' if found in KIND_NAMES else ''}{tail}", found)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_cifar_dir(data_dir: str, kind: str) -> str | None:
    """The batches folder for `kind` when data_dir is it or contains it, else None."""
    folder = CIFAR_DIRS[kind]
    inner = os.path.join(data_dir, folder)
    if os.path.isdir(inner):
        return inner
    if os.path.basename(os.path.normpath(data_dir)) == folder and os.path.isdir(data_dir):
        return data_dir
    return None


def val_split_name(path: str) -> str:
    """'val', or 'test' when only that exists (as in several CIFAR-as-JPEG mirrors)."""
    return "test" if not os.path.isdir(os.path.join(path, "val")) and os.path.isdir(os.path.join(path, "test")) else "val"


def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def is_flat_class_folder(path: str) -> bool:
    """`path/<class>/<images>`: sub-folders, none named train/val/test, the first holding an image."""
    names = _subfolders(path)
    if not names or any(n in SPLITS for n in names):
        return False
    for _, dirnames, filenames in os.walk(os.path.join(path, names[0]), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(is_image_file(f) for f in filenames if not f.startswith(".")):
            return True
    return False


def folder_splits(path: str) -> tuple[str, str | None] | None:
    """(train folder, val folder or None) of an image folder root in one of LAYOUTS, else None."""
    if os.path.isdir(os.path.join(path, "train")):
        val = os.path.join(path, val_split_name(path))
        return os.path.join(path, "train"), (val if os.path.isdir(val) else None)
    return (path, None) if is_flat_class_folder(path) else None


def is_image_folder_root(path: str) -> bool:
    return folder_splits(path) is not None


def detect_dataset(data_dir: str | None) -> str:
    """The dataset kind 'auto' means for data_dir (see `automix_fast.data.resolve_dataset`)."""
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
