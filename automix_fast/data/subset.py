"""`--train-subset FRACTION` and `--val-split FRACTION`: seeded, class-balanced draws from the
training set.

Mixing is a regulariser: it pays where the model can overfit, and on 2 CPU cores the way to
get there is less data trained for more epochs. The subset keeps round(fraction * n_c) images
of each class c (at least one), chosen by a generator seeded with `--train-subset-seed` only:
not by rank, not by epoch, not by the run's `--seed`, so every rank, every resume and every
seed of a study trains on the same images (seeds then compare training noise on fixed data).
The validation set is never subset. Both loaders read the subset, since it is applied to the
resolved dataset (file list or arrays) before either is built.

The val split holds out round(fraction * n_c) images of each class (at least one, and never a
class's last image: a class of one image keeps it for training and has none in val) of an image
folder that has no validation split of its own; the training set is the rest. Its generator has
a fixed seed of its own (no flag, not `--seed`, not `--train-subset-seed`), so an unchanged
folder splits the same way on every rank, resume, seed and run (the draw follows the list of
files: adding or removing one can move others).
A train subset is drawn after it, from the images left for training.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SUBSET_STREAM = 0x5B5E7  # keeps this generator apart from any other seeded with the same number
VAL_SPLIT_STREAM = 0x7A15E  # the val split's generator: seed 0 on this stream, always


def _per_class_draw(labels, count, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(drawn, rest): sorted indices into `labels`, `count(n_c)` drawn at random from each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), stream])
    drawn, rest = [], []
    for c in np.unique(labels):  # sorted classes: the draw order does not depend on the file order
        members = rng.permutation(np.flatnonzero(labels == c))
        k = count(len(members))
        drawn.append(members[:k])
        rest.append(members[k:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(drawn)) if drawn else empty), (np.sort(np.concatenate(rest)) if rest else empty)


def class_balanced_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into `labels` of the subset (see the module docstring)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train subset must be a fraction in (0, 1], got {fraction!r}")
    return _per_class_draw(labels, lambda n: max(1, int(round(fraction * n))), seed, SUBSET_STREAM)[0]


def class_balanced_val_split(labels, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): sorted indices into `labels` of the two parts (see the module docstring)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"val split must be a fraction in (0, 1), got {fraction!r}")
    held, kept = _per_class_draw(labels, lambda n: min(n - 1, max(1, int(round(fraction * n)))), 0, VAL_SPLIT_STREAM)
    return kept, held


def _cut_train(info, pick) -> None:
    """Replace `info`'s training samples (file list) or arrays by those at pick(labels)."""
    if info.train_samples is not None:
        idx = pick([y for _, y in info.train_samples])
        info.train_samples = [info.train_samples[i] for i in idx]
    else:
        images, labels = info.train_arrays
        idx = pick(labels)
        info.train_arrays = (images[idx], labels[idx])


def apply_train_subset(info, fraction: float | None, seed: int) -> None:
    """Cut `info`'s training samples (file list) or arrays down to the subset, in place."""
    if fraction is None or fraction == 1.0:
        return
    _cut_train(info, lambda labels: class_balanced_subset(labels, fraction, seed))


def apply_val_split(info, fraction: float) -> None:
    """Move the held-out part of `info`'s training file list to its (empty) validation list."""
    train, val = class_balanced_val_split([y for _, y in info.train_samples], fraction)
    samples = info.train_samples
    info.train_samples = [samples[i] for i in train]
    info.val_samples = [samples[i] for i in val]
