"""Torch loaders: a device-resident loader for small datasets and a streaming one for folders.

Resident (`ResidentLoader`): CIFAR arrays, and image folders of small images (the embedded set)
decoded once into a uint8 NHWC tensor on spec.device, when the eval view is the whole image at
the training size (`eval_crop_is_whole`: no crop_pct zoom). Each batch is an index_select plus,
for training, one batched pad-crop-flip gather, then normalization: no per-image Python, no workers.

Streaming (`StreamingLoader`): a torch DataLoader whose workers decode with PIL and crop to a
fixed-size uint8 HWC array (RandomResizedCrop + flip for ImageNet-style training; resize +
centre crop otherwise); batches are collated as uint8 NHWC (pinned on CUDA), moved with
non_blocking=True, and converted/normalized on the device, where the CIFAR-style crop and flip
also run batched. Moving uint8 instead of float32 is 4x less host->device traffic.

Sharding and randomness: the sample order and each rank's shard are shards.py's (shared with the
DALI loader). Augmentation draws are made for every position of the epoch's permutation from
(seed, epoch) (per sample for worker-side crops) and each rank takes the draws of its own positions, so a run repeats whatever the number of
workers, and N ranks with batch B augment each sample exactly as one process with batch N*B
does. Call set_epoch(e) before each epoch, as with DistributedSampler.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .bad_files import BadFiles, decode_reason
from .shards import Shards, seed_of
from .transforms import (cifar_augment, draw_cifar_params, eval_resize_for, load_rgb, norm_constants,
                         normalize_to, random_resized_crop, resize_center_crop, resize_uint8_batch)

RESIDENT_MAX_BYTES = 2 << 30  # decoded uint8 size above which a folder is streamed instead
RESIDENT_MAX_SIDE = 64  # folders of images at most this large (and img_size too) may be resident
_PROBE_FILES = 32  # files whose header is read to decide whether a folder holds small images


def resolve_aug(spec) -> str:
    """'cifar' (pad-crop-flip) for small images, 'imagenet' (random-resized-crop) otherwise."""
    if spec.aug != "auto":
        return spec.aug
    return "cifar" if spec.img_size <= 64 else "imagenet"


class _LoaderBase:
    """The contract surface: len, num_samples, set_epoch, start_at, and the device-side finishing step.

    Resuming inside an epoch: `set_epoch(e)`, then `start_at(b)`, then iterate. That iteration
    yields batches b, b+1, ... of this rank's epoch e, each exactly (images, augmentation,
    labels) as an iteration from batch 0 would have yielded it, and reads or decodes nothing of
    batches 0..b-1: the order, the per-sample crop seeds and the cifar-style crop/flip draws
    are functions of (seed, epoch, position in the epoch), so the later batches do not depend on
    the earlier ones having been made. `b` counts loader batches (micro-batches under
    --grad-accum-steps) of this rank's shard; `len(loader)` does not change; the start applies
    to the next iteration only. A loader without `start_at` is resumed by iterating over the
    batches done (engine/train.py). The DALI loader has the same method with the same order
    and batches, but its own augmentation draws (dali.py).
    """

    def __init__(self, n: int, spec, train: bool, aug: str):
        self.spec, self.train, self.aug = spec, train, aug
        self.device = spec.device
        self.shards = Shards(n, spec, train)
        self._mean, self._std_inv = norm_constants(spec.mean, spec.std, spec.device)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples

    @property
    def batch_size(self) -> int:
        return self.shards.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def start_at(self, batch: int) -> None:
        """The next iteration starts at batch `batch` of the current epoch (see the class doc)."""
        self.shards.start_at(batch)

    def _cifar_params(self):
        """Crop offsets and flips for the whole epoch, drawn once and moved to the device once."""
        if not (self.train and self.aug == "cifar"):
            return None
        # Drawn for every position of the epoch on every rank (cheap: 3 ints per image), then this
        # rank's positions kept: the draws do not depend on the number of ranks.
        total = self.shards.n
        dy, dx, flip = draw_cifar_params(total, self.spec.img_size, self.shards.aug_generator())
        mine = self.shards.positions(total)
        return dy[mine].to(self.device), dx[mine].to(self.device), flip[mine].to(self.device)

    def _finish(self, images: torch.Tensor, params, where) -> torch.Tensor:
        """uint8 NHWC on device -> augmented (train, cifar) and normalized NCHW. `where`: the batch's
        positions in the epoch (the start of a contiguous run, or a tensor of positions)."""
        if params is not None:
            if isinstance(where, int):
                where = slice(where, where + images.shape[0])
            images = cifar_augment(images, params[0][where], params[1][where], params[2][where],
                                   padding_mode=self.spec.crop_padding_mode)
        return normalize_to(images, self._mean, self._std_inv, self.spec.dtype, self.spec.channels_last)


class ResidentLoader(_LoaderBase):
    """The whole split as one uint8 NHWC tensor on the device; batches gathered and augmented there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec, train: bool, aug: str):
        super().__init__(len(labels), spec, train, aug)
        self.images = images.to(spec.device)
        self.labels = labels.to(device=spec.device, dtype=torch.int64)

    def __iter__(self):
        idx = self.shards.indices().to(self.device)
        params = self._cifar_params()
        bs = self.batch_size
        for start in range(self.shards.take_start() * bs, len(idx), bs):
            sel = idx[start:start + bs]
            yield self._finish(self.images.index_select(0, sel), params, start), self.labels.index_select(0, sel)


# ----------------------------------------------------------------------------- streaming

class _ImageDataset(torch.utils.data.Dataset):
    """Items are (index, seed) pairs from the sampler; returns (uint8 HWC size x size, label).

    The source is either a list of (path, label) or in-memory (uint8 NHWC, labels) arrays.
    mode: 'rrc' (RandomResizedCrop + flip, seeded per sample) or 'fixed' (resize + centre crop),
    resizing with the `interpolation` filter.
    """

    def __init__(self, samples=None, arrays=None, size: int = 224, mode: str = "fixed", resize_to: int | None = None,
                 interpolation: str = "bilinear"):
        self.samples, self.arrays = samples, arrays
        self.size, self.mode, self.resize_to, self.interpolation = size, mode, resize_to, interpolation

    def __len__(self) -> int:
        return len(self.samples) if self.samples is not None else len(self.arrays[1])

    def _image(self, index: int) -> tuple[Image.Image, int]:
        if self.samples is not None:
            path, label = self.samples[index]
            return load_rgb(path), label
        return Image.fromarray(self.arrays[0][index]), int(self.arrays[1][index])

    def __getitem__(self, item):
        """(uint8 image, label, position) or, for a file that cannot be decoded now (damaged, made
        unreadable or deleted after the pre-check), (None, why, position): the main process
        records it and leaves it out of the batch (see bad_files.py)."""
        index, seed, position = item
        try:
            img, label = self._image(index)
        except DataError as e:
            return None, str(e), position
        if self.mode == "rrc":
            image = random_resized_crop(img, self.size, np.random.default_rng(seed), interpolation=self.interpolation)
            return image, label, position
        return resize_center_crop(img, self.size, self.resize_to, self.interpolation), label, position


class _ShardBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches of (index, per-sample seed, position in the epoch) for the current
    epoch of `shards` (whole batches only for training), from batch `first` on; files recorded as
    left out (bad_files.py) are planned around."""

    def __init__(self, shards: Shards, paths: list[str] | None, bad_files):
        self.shards, self.paths, self.bad_files = shards, paths, bad_files
        self.first = 0  # set by the loader before each iteration (start_at)

    def items(self) -> list[tuple[int, int, int]]:
        idx = self.shards.indices().tolist()
        s = self.shards.spec
        # One seed per position of the epoch, the same on every rank; this rank keeps its positions.
        seeds = np.random.default_rng(seed_of(s.seed, self.shards.epoch, 0, 2)).integers(0, 2**62, self.shards.n)
        seeds = seeds[self.shards.positions(self.shards.n)][: len(idx)].tolist()
        return list(zip(idx, seeds, range(len(idx))))

    def __iter__(self):
        items = self.items()
        bs = self.shards.batch_size
        left_out = self.bad_files.left_out if self.paths is not None else ()
        order = [i for i, _, _ in items] if self.shards.train else None
        for start in range(self.first * bs, len(items), bs):
            batch = items[start:start + bs]
            if left_out:  # empty unless a file failed: a clean run does no per-batch work here
                keep = self.bad_files.plan([i for i, _, _ in batch], self.paths, order)
                batch = [it for it in batch if it[0] in keep] or [it for it in items if it[0] in keep][: len(keep)]
                if not batch:
                    continue
            yield batch

    def __len__(self) -> int:
        return len(self.shards)


def _collate(batch):
    """uint8 NHWC images, labels, positions in the epoch, and [(position, why)] of failed files."""
    good = [b for b in batch if b[0] is not None]
    failed = [(b[2], b[1]) for b in batch if b[0] is None]
    images = torch.from_numpy(np.stack([b[0] for b in good])) if good else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    positions = torch.tensor([b[2] for b in good], dtype=torch.int64)
    return images, labels, positions, failed


class StreamingLoader(_LoaderBase):
    """DataLoader workers decode and crop to uint8; conversion and normalization run on the device."""

    def __init__(self, dataset: _ImageDataset, spec, train: bool, aug: str, bad_files=None):
        super().__init__(len(dataset), spec, train, aug)
        workers = spec.workers
        self.bad_files = bad_files if bad_files is not None else BadFiles(spec.skip_bad_images, spec.rank == 0)
        self.paths = [p for p, _ in dataset.samples] if dataset.samples is not None else None
        self.sampler = _ShardBatchSampler(self.shards, self.paths, self.bad_files)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=spec.device.type == "cuda",
            persistent_workers=workers > 0,  # forking workers every epoch costs seconds on big sets
            prefetch_factor=4 if workers > 0 else None,
        )

    def __iter__(self):
        self.sampler.first = self.shards.take_start()  # the sampler runs in this process, workers or not
        params = self._cifar_params()
        order = self.shards.indices().tolist()
        for images, labels, positions, failed in self.loader:
            for position, why in failed:  # decoded by no one: named once, left out from now on
                path = self.paths[order[position]]
                self.bad_files.record(path, "Pillow: " + decode_reason(why, path), try_pillow=False)
            if images.shape[0] == 0:
                if not self.train:
                    continue  # nothing readable left in this val batch
                images, labels, positions = self._refill(len(failed))  # every step needs a batch (DDP)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            where = positions.to(self.device, non_blocking=True) if params is not None else None
            yield self._finish(images, params, where), labels

    def _refill(self, n: int):
        """A training batch whose files all failed: the first readable files of the epoch instead,
        decoded here (the rule of bad_files.py; only reached when every file of a batch fails)."""
        got = []
        for item in self.sampler.items():
            if self.paths[item[0]] in self.bad_files.left_out:
                continue
            sample = self.loader.dataset[item]
            if sample[0] is None:
                self.bad_files.record(self.paths[item[0]], "Pillow: " + decode_reason(sample[1], self.paths[item[0]]),
                                      try_pillow=False)
                continue
            got.append(sample)
            if len(got) == n:
                break
        if not got:
            raise DataError("no image file of this training set can be decoded any more")
        images, labels, positions, _ = _collate(got)
        return images, labels, positions


# ----------------------------------------------------------------------------- choosing and building

def _probe_small(samples: list[tuple[str, int]]) -> bool:
    """True when evenly spaced files (header only, no decode) are all at most RESIDENT_MAX_SIDE."""
    step = max(1, len(samples) // _PROBE_FILES)
    for path, _ in samples[::step][:_PROBE_FILES]:
        try:
            with Image.open(path) as img:
                if max(img.size) > RESIDENT_MAX_SIDE:
                    return False
        except (OSError, Image.DecompressionBombError):
            return False  # let the streaming loader report the file later (bad_files.py)
    return True


def folder_fits_resident(info, spec, aug: str) -> bool:
    """Small-image folders (e.g. the embedded set) with CIFAR-style aug are decoded once into memory."""
    if aug != "cifar" or spec.img_size > RESIDENT_MAX_SIDE:
        return False
    total = (info.num_train + info.num_val) * spec.img_size ** 2 * 3
    return total <= RESIDENT_MAX_BYTES and _probe_small(info.train_samples) and _probe_small(info.val_samples)


def decode_folder(samples: list[tuple[str, int]], size: int, threads: int | None = None, bad_files=None,
                  interpolation: str = "bilinear"):
    """All images decoded, resized (shorter side, with the `interpolation` filter) and
    centre-cropped to size: (uint8 NHWC, int64).

    With `bad_files` (bad_files.BadFiles), a file Pillow cannot decode is recorded there and left
    out of the arrays; without it, the first such file raises its DataError."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    failed: dict[int, str] = {}

    def fill(i: int) -> None:
        try:
            out[i] = resize_center_crop(load_rgb(samples[i][0]), size, interpolation=interpolation)
        except DataError as e:
            if bad_files is None:
                raise
            failed[i] = "Pillow: " + decode_reason(str(e), samples[i][0])

    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL releases the GIL while decoding
        list(pool.map(fill, range(len(samples)), chunksize=64))
    labels = np.array([y for _, y in samples], dtype=np.int64)
    if not failed:
        return out, labels
    for i in sorted(failed):
        bad_files.record(samples[i][0], failed[i], try_pillow=False)
    keep = np.array([i not in failed for i in range(len(samples))])
    return out[keep], labels[keep]


def _resident_pair(arrays, spec, train: bool, aug: str) -> ResidentLoader:
    images = resize_uint8_batch(torch.from_numpy(np.ascontiguousarray(arrays[0])), spec.img_size,
                                spec.filter_for(train))
    return ResidentLoader(images, torch.from_numpy(np.asarray(arrays[1])), spec, train, aug)


def eval_crop_is_whole(spec, aug: str) -> bool:
    """Whether the eval view is the whole image at the training size (no zoom before the crop):
    the resident loaders hold their images at that size, so they serve only this view."""
    return eval_resize_for(spec.img_size, aug, spec.crop_pct) == spec.img_size


def build_torch_loaders(spec, info):
    """(train_loader, val_loader) for a resolved dataset, resident when it fits, else streaming."""
    aug = resolve_aug(spec)
    whole = eval_crop_is_whole(spec, aug)
    if whole and info.train_arrays is not None and aug == "cifar":
        return _resident_pair(info.train_arrays, spec, True, aug), _resident_pair(info.val_arrays, spec, False, aug)
    if whole and info.train_samples is not None and folder_fits_resident(info, spec, aug):
        train = decode_folder(info.train_samples, spec.img_size, bad_files=info.bad_files,
                              interpolation=spec.train_interpolation)
        val = decode_folder(info.val_samples, spec.img_size, bad_files=info.bad_files, interpolation=spec.interpolation)
        if info.bad_files is not None and info.bad_files.left_out and not spec.skip_bad_images:
            info.bad_files.stop_after_epoch(before_training=True)  # refuse as the pre-check does
        return _resident_pair(train, spec, True, aug), _resident_pair(val, spec, False, aug)
    return _streaming(info, spec, True, aug), _streaming(info, spec, False, aug)


def _streaming(info, spec, train: bool, aug: str) -> StreamingLoader:
    source = dict(samples=info.train_samples if train else info.val_samples) if info.train_samples is not None \
        else dict(arrays=info.train_arrays if train else info.val_arrays)
    interpolation = spec.filter_for(train)
    if train and aug == "imagenet":
        dataset = _ImageDataset(**source, size=spec.img_size, mode="rrc", interpolation=interpolation)
    else:  # cifar-style train (crop/flip follow on the device; the eval zoom is not theirs) and every eval
        resize_to = spec.img_size if train else eval_resize_for(spec.img_size, aug, spec.crop_pct)
        dataset = _ImageDataset(**source, size=spec.img_size, mode="fixed", resize_to=resize_to,
                                interpolation=interpolation)
    return StreamingLoader(dataset, spec, train, aug, info.bad_files)
