"""Image folders (ImageFolder layout) and the bad-file policy shared by every loader.

Layouts (LAYOUTS says them in one line): `DIR/train/<class>/**/<image>` and
`DIR/val/<class>/**/<image>` (`DIR/test/` is taken for val when there is no val/, as
CIFAR-as-JPEG mirrors ship it); or a folder without a validation split, `DIR/train/<class>/`
alone or a flat `DIR/<class>/`, with `val_split` (subset.py: a seeded class-balanced part of
it is held out for validation). The label of a file is the index of its class folder's name in
the sorted list of class names, and train and val must hold the same class names. Image files
are those ending in .jpg .jpeg .png .bmp .webp (any case); other files are ignored, and so are folders and files whose name starts with a dot.

Bad-file policy (the torch and the DALI loaders both read the lists made here, so both follow it):
every image file is checked cheaply BEFORE training starts, on threads: its first bytes must be a
JPEG, PNG, BMP or WEBP signature, and its end must be intact (a JPEG ends with the EOI marker
FF D9, trailing zero padding allowed; a PNG ends with its IEND chunk; BMP and WEBP files are at
least as long as their header says). This catches garbage and truncated files, the usual damage
of an interrupted copy, without decoding anything. A JPEG or PNG whose last bytes are not its
end marker is not always damaged: phones append data after it (Samsung's trailer, the video of
a motion photo), and copy tools a line ending or fill bytes. Only such a file is looked at
further: a JPEG is decoded with Pillow and is truncated when that decode fails; a PNG's chunks
are walked and it is truncated when they end before a whole IEND chunk (Pillow decodes a PNG
cut inside its last chunks, which DALI's decoder rejects). By default any bad file stops the run with a
DataError naming the first few paths and the count and suggesting `--skip-bad-images`; with
skip_bad=True they are dropped and one warning line names them. A file that passes the check but
fails to decode later is handled by the loaders mid-run (bad_files.py): the check is cheap, not a
full decode.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..errors import DataError
from .layout import IMAGE_EXTENSIONS, LAYOUTS, LayoutError, folder_splits, is_image_file, layout_error, val_split_name
from .spec import DatasetInfo
from .subset import apply_val_split

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_BYTES = 4096  # one block: the end marker and usual zero padding in a single read
_SHOW_BAD = 3  # paths named in the one-line error / warning


def _tail_without_padding(f, size: int) -> bytes:
    """The last bytes of the file before any trailing zeros (padding may span whole blocks)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_BYTES)
        f.seek(start)
        chunk = f.read(end - start).rstrip(b"\x00")
        if chunk:
            return chunk
        end = start
    return b""


def _decodes(path: str) -> bool:
    """True when Pillow decodes the whole of JPEG `path`: the check of a file whose end marker
    is followed by other bytes (a truncated file raises before its last row)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError:
        return True  # too large for Pillow, not truncated: the loaders say so when they reach it
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the file does not decode
        return False
    return True


def _png_has_iend(path: str, size: int) -> bool:
    """True when the chunks of PNG `path` lead, each whole, to a whole IEND chunk (whatever
    follows it): one small read per chunk."""
    pos = len(_PNG_SIGNATURE)
    try:
        with open(path, "rb") as f:
            while pos + 12 <= size:
                f.seek(pos)
                header = f.read(8)
                end = pos + 12 + int.from_bytes(header[:4], "big")
                if end > size:
                    return False
                if header[4:8] == b"IEND":
                    return f.read(4) == _PNG_END[4:]
                pos = end
    except OSError:
        return False
    return False


def image_problem(path: str) -> str | None:
    """Why `path` is not a usable image file, or None when the cheap check passes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            tail = _tail_without_padding(f, size)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        # Encoders and some copy tools pad with zeros after EOI; DALI and PIL accept that.
        return None if tail.endswith(b"\xff\xd9") or _decodes(path) else "truncated JPEG (no end marker)"
    if head.startswith(_PNG_SIGNATURE):
        return None if tail.endswith(_PNG_END) or _png_has_iend(path, size) else "truncated PNG (no IEND chunk)"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if size >= declared else "truncated BMP"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if size >= declared else "truncated WEBP"
    return "not a JPEG, PNG, BMP or WEBP file"


def find_bad_images(paths: list[str], threads: int = 16) -> list[tuple[str, str]]:
    """(path, problem) for every path that fails `image_problem`, in input order."""
    if not paths:
        return []
    # The check is I/O bound (two small reads per file): threads overlap the disk latency.
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        problems = list(pool.map(image_problem, paths, chunksize=256))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]


def apply_bad_image_policy(samples: list[tuple[str, int]], skip_bad: bool, where: str,
                           dropped: list | None = None) -> list[tuple[str, int]]:
    """The one place the bad-file policy lives: refuse (default) or drop with one warning line;
    the dropped (path, problem) pairs are appended to `dropped` when given."""
    bad = find_bad_images([p for p, _ in samples])
    if not bad:
        return samples
    shown = "; ".join(f"{p}: {why}" for p, why in bad[:_SHOW_BAD])
    more = f" (and {len(bad) - _SHOW_BAD} more)" if len(bad) > _SHOW_BAD else ""
    if not skip_bad:
        raise DataError(
            f"{len(bad)} unreadable image file(s) in {where}: {shown}{more}; "
            "fix or delete them, or pass --skip-bad-images to leave them out"
        )
    print(f"warning: skipping {len(bad)} unreadable image file(s) in {where}: {shown}{more}", file=sys.stderr)
    if dropped is not None:
        dropped.extend(bad)
    gone = {p for p, _ in bad}
    return [(p, y) for p, y in samples if p not in gone]


def _list_images(class_dir: str) -> list[str]:
    """Image files under class_dir, recursively, in a stable (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and is_image_file(f))
    return found


def scan_image_folder(root: str, skip_bad: bool = False, dropped: list | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of one split folder `root/<class>/...`, checked by the bad-file policy
    (files it drops are appended to `dropped`, see apply_bad_image_policy).

    samples are (path, label) with label = index of the class in the sorted class list.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    samples = []
    for label, name in enumerate(classes):
        files = _list_images(os.path.join(root, name))
        if not files:
            raise DataError(f"class folder '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}): {os.path.join(root, name)}")
        samples.extend((p, label) for p in files)
    samples = apply_bad_image_policy(samples, skip_bad, root, dropped)
    emptied = sorted(set(range(len(classes))) - {y for _, y in samples})
    if emptied:
        raise DataError(f"class folder '{classes[emptied[0]]}' has no readable images left in {root}")
    return classes, samples


def _needs_val_split(data_dir: str, train_dir: str) -> str:
    """The one-line error for a folder without a validation split given no --val-split."""
    what = f"{data_dir} has train/ but no val/ or test/" if train_dir != data_dir else \
        f"{data_dir} holds class folders but no val/ or test/ split"
    parent = os.path.dirname(os.path.normpath(data_dir))
    above = folder_splits(parent) if os.path.basename(os.path.normpath(data_dir)) == "train" else None
    hint = f", or pass --data-dir {parent} (it holds train/ and {val_split_name(parent)}/)" if above and above[1] else ""
    return (f"{what}: pass --val-split 0.1 to hold out a class-balanced tenth of it for validation{hint} "
            f"(accepted layouts: {LAYOUTS})")


def resolve_image_folder(data_dir: str, skip_bad: bool = False, kind: str = "folder", val_split: float | None = None):
    """DatasetInfo of an image folder in one of LAYOUTS; train and val must name the same classes.
    A folder without val/ or test/ needs `val_split` (subset.apply_val_split); one with them
    refuses it. Files the bad-file policy drops are listed in the info's `screened_out`."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    splits = folder_splits(data_dir)
    if splits is None:
        raise layout_error(data_dir, f"{data_dir} is not an image folder", f"; accepted layouts: {LAYOUTS}")
    train_dir, val_dir = splits
    if val_dir is None and val_split is None:
        raise LayoutError(_needs_val_split(data_dir, train_dir))
    if val_dir is not None and val_split is not None:
        raise DataError(f"--val-split {val_split:g} holds out part of a folder without a validation split, "
                        f"but {data_dir} has {os.path.basename(val_dir)}/: drop --val-split")
    dropped: list = []
    classes, train = scan_image_folder(train_dir, skip_bad, dropped)
    if val_dir is None:
        info = DatasetInfo(kind=kind, root=data_dir, classes=classes, train_samples=train, val_samples=[])
        apply_val_split(info, val_split)
        info.screened_out = dropped
        return info
    val_split_dir = os.path.basename(val_dir)
    val_classes, val = scan_image_folder(val_dir, skip_bad, dropped)
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(
            f"train/ and {val_split_dir}/ class folders differ in {data_dir}: "
            f"only in train: {only_train[:5] or 'none'}; only in {val_split_dir}: {only_val[:5] or 'none'}"
        )
    return DatasetInfo(kind=kind, root=data_dir, classes=classes, train_samples=train, val_samples=val,
                       screened_out=dropped)
