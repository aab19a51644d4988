"""`--train-subset FRACTION`: train on a seeded, class-balanced part of the training set.

Mixing is a regulariser: it pays where the model can overfit, and on 2 CPU cores the way to
get there is less data trained for more epochs. The subset keeps round(fraction * n_c) images
of each class c (at least one), chosen by a generator seeded with `--train-subset-seed` only:
not by rank, not by epoch, not by the run's `--seed`, so every rank, every resume and every
seed of a study trains on the same images (seeds then compare training noise on fixed data).
The validation set is never subset. Both loaders read the subset, since it is applied to the
resolved dataset (file list or arrays) before either is built.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SUBSET_STREAM = 0x5B5E7  # keeps this generator apart from any other seeded with the same number


def class_balanced_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into `labels` of the subset (see the module docstring)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train subset must be a fraction in (0, 1], got {fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), SUBSET_STREAM])
    keep = []
    for c in np.unique(labels):  # sorted classes: the draw order does not depend on the file order
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        keep.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def apply_train_subset(info, fraction: float | None, seed: int) -> None:
    """Cut `info`'s training samples (file list) or arrays down to the subset, in place."""
    if fraction is None or fraction == 1.0:
        return
    if info.train_samples is not None:
        idx = class_balanced_subset([y for _, y in info.train_samples], fraction, seed)
        info.train_samples = [info.train_samples[i] for i in idx]
    else:
        images, labels = info.train_arrays
        idx = class_balanced_subset(labels, fraction, seed)
        info.train_arrays = (images[idx], labels[idx])
