"""data/subset.py: --train-subset, a class-balanced seeded subset of the training set, the same on
every rank and for both loaders."""
from __future__ import annotations

import numpy as np
import pytest

from automix_fast.config import build_config
from automix_fast.data import DataSpec, DatasetInfo, build_loaders
from automix_fast.data.subset import apply_train_subset, class_balanced_subset, class_balanced_val_split
from automix_fast.errors import ConfigError


def test_subset_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [100, 100, 100, 100])
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]  # classes interleaved, as in a shuffled file list
    idx = class_balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(idx, class_balanced_subset(labels, 0.1, seed=3))  # deterministic
    assert not np.array_equal(idx, class_balanced_subset(labels, 0.1, seed=4))  # the seed matters
    assert len(class_balanced_subset(labels, 1.0, seed=3)) == 400
    # Unequal classes keep their own share; a tiny fraction still keeps one image per class.
    uneven = np.repeat(np.arange(3), [50, 20, 3])
    assert np.bincount(uneven[class_balanced_subset(uneven, 0.2, 0)]).tolist() == [10, 4, 1]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_subset_fraction_is_checked(bad):
    with pytest.raises(ConfigError, match="--train-subset"):
        build_config(overrides={"train_subset": bad})
    with pytest.raises(ConfigError, match="fraction"):
        class_balanced_subset([0, 1], bad, 0)


def test_subset_of_arrays_and_file_lists():
    images = np.arange(60, dtype=np.uint8).reshape(60, 1, 1, 1)
    labels = np.arange(60) % 3
    info = DatasetInfo(kind="cifar10", root="mem", classes=["a", "b", "c"], train_arrays=(images, labels),
                       val_arrays=(images, labels))
    apply_train_subset(info, 0.5, seed=1)
    got_images, got_labels = info.train_arrays
    assert np.bincount(got_labels).tolist() == [10, 10, 10]
    np.testing.assert_array_equal(got_images[:, 0, 0, 0] % 3, got_labels)  # images stay with their labels
    assert len(info.val_arrays[1]) == 60  # validation is never subset
    files = DatasetInfo(kind="folder", root="x", classes=["a", "b"], train_samples=[(f"{i}.jpg", i % 2) for i in range(20)],
                        val_samples=[])
    apply_train_subset(files, 0.3, seed=1)
    assert sorted(y for _, y in files.train_samples) == [0, 0, 0, 1, 1, 1]
    assert all(int(p[:-4]) % 2 == y for p, y in files.train_samples)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loaders_train_on_the_subset_on_every_rank(tiny_data, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    seen = []
    for rank in (0, 1):
        spec = DataSpec(dataset="auto", data_dir=tiny_data, batch_size=2, workers=0, loader=loader, rank=rank,
                        world_size=2, seed=rank + 7, train_subset=0.3, train_subset_seed=11)
        train, _, info = build_loaders(spec)
        assert info.num_train == 30 and info.num_val == 20
        assert np.bincount([y for _, y in info.train_samples], minlength=10).tolist() == [3] * 10
        assert len(train) == 30 // 2 // 2  # each rank's share of the subset
        seen.append([p for p, _ in info.train_samples])
    assert seen[0] == seen[1]  # the same subset on every rank, whatever --seed


def test_val_split_holds_out_at_least_one_image_of_a_class_but_never_its_last():
    """Classes of 1, 2, 3 and 30 images at --val-split 0.1: 0, 1, 1 and 3 held out (the class of
    one image keeps it for training); the same labels always split the same way."""
    labels = np.repeat(np.arange(4), [1, 2, 3, 30])
    train, val = class_balanced_val_split(labels, 0.1)
    assert np.bincount(labels[val], minlength=4).tolist() == [0, 1, 1, 3]
    assert np.bincount(labels[train], minlength=4).tolist() == [1, 1, 2, 27]
    again = class_balanced_val_split(labels, 0.1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
