"""Sharding for both loaders: which samples each rank reads in an epoch, and in what order.

Train: one permutation of the whole set per (seed, epoch), the same on every rank; rank r takes
every world_size-th index from position r; every rank gets n // world_size // batch_size whole
batches (equal counts keep DDP's collectives in step) and the remainder is dropped. A train set
with no whole batch per rank is a DataError (`check_full_batch`, raised when a loader is built).
Val keeps order: rank r reads the r-th contiguous slice, the last batch may be smaller, and every
sample is seen exactly once over the ranks. The order of epoch e is a function of (seed, e) alone.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers (seed, epoch, rank, stream)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def check_full_batch(n: int, batch_size: int, world_size: int) -> None:
    """Raise DataError unless a train set of `n` gives every one of `world_size` ranks a whole batch."""
    if n // world_size < batch_size:
        raise DataError(f"train set has {n} images: too few for one batch of {batch_size} on each of {world_size} rank(s)")


def train_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's train indices for `epoch`: a strided shard of one shared permutation, whole batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch, 0)))
    per_rank = n // world_size  # equal counts on all ranks keep DDP's collectives in step
    shard = perm[rank::world_size][:per_rank]
    return shard[: per_rank // batch_size * batch_size]


def val_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous val slice; slices tile 0..n exactly."""
    return rank * n // world_size, (rank + 1) * n // world_size


class Shards:
    """One loader's epoch and index plan over `n` samples: spec gives seed, rank, world_size and the
    batch sizes; `train` selects the shuffled whole-batch plan (checked by `check_full_batch`) or
    the ordered val slice. Call set_epoch(e) before each epoch; `start_at(b)` makes the next
    iteration begin at batch b (the loaders' contract, torch_loader._LoaderBase)."""

    def __init__(self, n: int, spec, train: bool):
        self.n, self.spec, self.train = n, spec, train
        self.batch_size = spec.batch_size if train else spec.eval_batch_size
        self.epoch = 0
        self._first = 0  # the batch the next iteration starts at
        if train:
            check_full_batch(n, spec.batch_size, spec.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, batch: int) -> None:
        """The next iteration starts at this rank's batch `batch` (0-based) of the current epoch."""
        if not 0 <= batch < max(len(self), 1):
            raise ValueError(f"start_at({batch}): an epoch here has {len(self)} batches")
        self._first = int(batch)

    def take_start(self) -> int:
        """The batch this iteration starts at (set by start_at, else 0); later iterations start at 0."""
        first, self._first = self._first, 0
        return first

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in reading order."""
        if self.train:
            s = self.spec
            return train_indices(self.n, self.batch_size, s.seed, self.epoch, s.rank, s.world_size)
        start, stop = val_range(self.n, self.spec.rank, self.spec.world_size)
        return torch.arange(start, stop)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch."""
        if self.train:
            return self.n // self.spec.world_size // self.batch_size * self.batch_size
        start, stop = val_range(self.n, self.spec.rank, self.spec.world_size)
        return stop - start

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def aug_generator(self) -> torch.Generator:
        """The epoch's augmentation generator, the same on every rank (see `positions`)."""
        return torch.Generator().manual_seed(seed_of(self.spec.seed, self.epoch, 0, 1))

    def positions(self, total: int) -> slice:
        """Which of `total` per-epoch draws (one per position of the shared order) are this rank's:
        train shards are strided (rank::world_size), val shards contiguous."""
        if self.train:
            s = self.spec
            return slice(s.rank, s.rank + s.world_size * self.num_samples, s.world_size)
        start, stop = val_range(self.n, self.spec.rank, self.spec.world_size)
        return slice(start, stop)
