"""CIFAR-10 / CIFAR-100 from the official python batches, loaded into memory.

`cifar-10-batches-py/` holds data_batch_1..5, test_batch and batches.meta; `cifar-100-python/`
holds train, test and meta (fine labels are used). Each batch is a pickle of a dict whose
b"data" is (N, 3072) uint8 in CHW row order. The whole set is 180 MB at most, so it is read
once into uint8 NHWC arrays that the resident loader puts on the device.

A pickle can run any code it names, and these files come from a folder the user downloaded, so
they are read with `SafeUnpickler`: it rebuilds only what the official batches hold (dicts,
lists, strings, bytes, numbers, numpy arrays and dtypes) and refuses any other global with a
one-line DataError naming the file, before anything it names is called.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from ..errors import DataError
from .layout import CIFAR10_DIR, CIFAR100_DIR, find_cifar_dir, layout_error
from .spec import DatasetInfo

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_LAYOUT = {
    # kind: (folder name, train files, val files, label key, meta file, class-names key)
    "cifar10": (CIFAR10_DIR, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "batches.meta", "label_names"),
    "cifar100": (CIFAR100_DIR, ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it, and nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how bytes are pickled")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The globals the official batches name (numpy arrays and dtypes, bytes from protocol 2)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # written by numpy 1.x / 2.x
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, bytes, numbers, numpy arrays and dtypes; any other global
    (a function that would run, a class that would be built) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        found = _allowed_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds (refused, nothing was run)")
        return found


def _load_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"missing CIFAR file: {path}")
    try:
        with open(path, "rb") as f:
            raw = SafeUnpickler(f, encoding="bytes").load()  # the batches were written by Python 2
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise DataError(f"cannot read CIFAR file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise DataError(f"cannot read CIFAR file {path}: it holds a {type(raw).__name__}, not a dict")
    # Python-2 pickles have bytes keys; batches re-saved by Python 3 have str keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _load_split(root: str, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        batch = _load_pickle(os.path.join(root, name))
        if "data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file {os.path.join(root, name)} has no 'data'/'{label_key}' entry")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"CIFAR file {os.path.join(root, name)}: data has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _class_names(root: str, kind: str, num_classes: int) -> list[str]:
    meta_file, key = _LAYOUT[kind][4], _LAYOUT[kind][5]
    path = os.path.join(root, meta_file)
    if os.path.isfile(path):
        names = _load_pickle(path).get(key)
        if names is not None and len(names) == num_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return CIFAR10_CLASSES[:] if kind == "cifar10" else [f"class_{i:03d}" for i in range(num_classes)]


def load_cifar(data_dir: str, kind: str):
    """DatasetInfo with train_arrays/val_arrays = (uint8 NHWC, int64 labels) for cifar10|cifar100."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    root = find_cifar_dir(data_dir, kind)
    if root is None:
        raise layout_error(data_dir, f"no {_LAYOUT[kind][0]}/ folder in {data_dir}")
    _, train_files, val_files, label_key, _, _ = _LAYOUT[kind]
    train = _load_split(root, train_files, label_key)
    val = _load_split(root, val_files, label_key)
    num_classes = 10 if kind == "cifar10" else 100
    for split, (_, y) in (("train", train), ("test", val)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{kind} {split} labels out of range 0..{num_classes - 1} in {root}")
    return DatasetInfo(kind=kind, root=root, classes=_class_names(root, kind, num_classes), train_arrays=train, val_arrays=val)
