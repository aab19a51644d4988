"""The embedded default dataset: deterministic, atomic, ImageFolder layout of real JPEGs."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from automix_fast.data import DataSpec, resolve_dataset
from automix_fast.data import embedded as E


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_layout_and_counts(tmp_path):
    root = E.ensure_embedded_dataset(str(tmp_path), train_per_class=3, val_per_class=2)
    assert os.path.dirname(root) == str(tmp_path) and os.path.basename(root).startswith(E.NAME)
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(os.listdir(os.path.join(root, split))) == sorted(E.CLASSES)
        for name in E.CLASSES:
            files = sorted(os.listdir(os.path.join(root, split, name)))
            assert files == [f"{i:05d}.jpg" for i in range(n)]
    with Image.open(os.path.join(root, "train", "disc", "00000.jpg")) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert len(E.CLASSES) == 10 and all(c.replace("_", "").isalpha() for c in E.CLASSES)


def test_generation_is_deterministic(tmp_path):
    a = _files(E.ensure_embedded_dataset(str(tmp_path / "a"), 2, 1))
    b = _files(E.ensure_embedded_dataset(str(tmp_path / "b"), 2, 1))
    assert len(a) == 30 and a == b
    # Each image has its own seed, so a smaller set is a prefix of a larger one.
    c = _files(E.ensure_embedded_dataset(str(tmp_path / "c"), 3, 1))
    assert all(c[k] == v for k, v in a.items())


def test_second_call_reuses(tmp_path, monkeypatch):
    root = E.ensure_embedded_dataset(str(tmp_path), 1, 1)
    monkeypatch.setattr(E, "render_image", lambda *a, **k: pytest.fail("regenerated"))
    assert E.ensure_embedded_dataset(str(tmp_path), 1, 1) == root


def test_stale_temp_dir_is_ignored(tmp_path):
    stale = tmp_path / f".{E.dataset_dir_name(1, 1)}.tmp-dead"
    os.makedirs(stale / "train" / "disc")
    (stale / "train" / "disc" / "00000.jpg").write_bytes(b"half written")
    root = E.ensure_embedded_dataset(str(tmp_path), 1, 1)
    assert root == str(tmp_path / E.dataset_dir_name(1, 1))
    assert len(_files(root)) == 20  # generated afresh, not taken from the stale folder


def test_lost_race_keeps_winner_and_cleans_up(tmp_path, monkeypatch):
    real_rename = os.rename

    def racing(src, dst):  # another process finishes first, so our rename fails
        os.makedirs(os.path.join(dst, "train"))
        return real_rename(src, dst)

    monkeypatch.setattr(E.os, "rename", racing)
    root = E.ensure_embedded_dataset(str(tmp_path), 1, 1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [os.path.basename(root)]  # no temp folder left behind


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "render_image", boom)
    with pytest.raises(RuntimeError):
        E.ensure_embedded_dataset(str(tmp_path), 1, 1)
    assert os.listdir(tmp_path) == []


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMIX_FAST_CACHE", str(tmp_path))
    assert E.default_cache_dir() == str(tmp_path)


def test_auto_without_data_dir_is_embedded(tmp_path, monkeypatch):
    import automix_fast.data

    real = E.ensure_embedded_dataset
    monkeypatch.setattr(automix_fast.data, "ensure_embedded_dataset", lambda cache=None: real(str(tmp_path), 2, 1))
    info = resolve_dataset(DataSpec())
    assert info.kind == "embedded" and info.classes == sorted(E.CLASSES)
    assert info.num_train == 20 and info.num_val == 10


def test_classes_differ_in_pixels():
    imgs = [E.render_image(k, E._image_rng("train", k, 0)) for k in range(len(E.CLASSES))]
    assert all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in imgs)
    assert len({i.tobytes() for i in imgs}) == len(imgs)
