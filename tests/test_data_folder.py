"""data/folder.py: scanning an image folder (labels, nested files, empty or mismatched classes) and
the bad-file pre-check (--skip-bad-images)."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from automix_fast.data import resolve_dataset
from automix_fast.data.folder import image_problem, scan_image_folder
from automix_fast.errors import DataError
from datakit import folder_spec, make_folder, rgb


def test_scan_labels_are_sorted_class_indices(tmp_path):
    make_folder(tmp_path, classes=("zebra", "ant", "moth"), per_class=2)
    classes, samples = scan_image_folder(str(tmp_path / "train"))
    assert classes == ["ant", "moth", "zebra"]
    assert len(samples) == 6
    for path, label in samples:
        assert classes[label] == os.path.basename(os.path.dirname(path))


def test_scan_ignores_other_files_and_finds_nested(tmp_path):
    make_folder(tmp_path, per_class=1)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    os.makedirs(tmp_path / "train" / "cat" / "sub")
    Image.fromarray(rgb(8, 8, 1)).save(tmp_path / "train" / "cat" / "sub" / "x.PNG")
    _, samples = scan_image_folder(str(tmp_path / "train"))
    assert sorted(os.path.basename(p) for p, _ in samples) == ["0.jpg", "0.jpg", "x.PNG"]


def test_empty_class_folder_is_named(tmp_path):
    make_folder(tmp_path)
    os.makedirs(tmp_path / "val" / "emu")
    with pytest.raises(DataError, match="'emu'"):
        resolve_dataset(folder_spec(tmp_path))


def test_class_mismatch(tmp_path):
    make_folder(tmp_path, splits=("train",), classes=("cat", "dog"))
    make_folder(tmp_path, splits=("val",), classes=("cat", "owl"))
    with pytest.raises(DataError, match=r"differ.*\['dog'\].*\['owl'\]"):
        resolve_dataset(folder_spec(tmp_path))


def _truncated_jpeg(path):
    Image.fromarray(rgb(16, 16, 3)).save(path, quality=90)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_bad_image_refused_before_training(tmp_path, damage):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "bad.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not an image at all")
    elif damage == "truncated":
        _truncated_jpeg(bad)
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError) as err:
        resolve_dataset(folder_spec(tmp_path))
    msg = str(err.value)
    assert str(bad) in msg and msg.startswith("1 unreadable") and "--skip-bad-images" in msg and "\n" not in msg


def test_skip_bad_images_drops_and_warns(tmp_path, capsys):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog" / "bad1.jpg").write_bytes(b"garbage")
    _truncated_jpeg(tmp_path / "val" / "cat" / "bad2.jpg")
    info = resolve_dataset(folder_spec(tmp_path, skip_bad_images=True))
    assert info.num_train == 6 and info.num_val == 6
    assert all(not os.path.basename(p).startswith("bad") for p, _ in info.train_samples + info.val_samples)
    err = capsys.readouterr().err
    assert "bad1.jpg" in err and "bad2.jpg" in err and err.count("warning:") == 2


def test_jpeg_with_zero_padding_and_other_formats_pass(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray(rgb(8, 8, 0)).save(p)
    p.write_bytes(p.read_bytes() + b"\x00" * 100)
    assert image_problem(str(p)) is None
    for ext in ("png", "bmp", "webp"):
        q = tmp_path / f"a.{ext}"
        Image.fromarray(rgb(8, 8, 0)).save(q)
        assert image_problem(str(q)) is None, ext
        q.write_bytes(q.read_bytes()[:-10])
        assert image_problem(str(q)) is not None, ext
