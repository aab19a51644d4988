"""data/folder.py: scanning an image folder (labels, nested files, empty or mismatched classes) and
the bad-file pre-check (--skip-bad-images)."""
from __future__ import annotations

import os

import numpy as np
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


def _encoded(fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb(20, 24, 5)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# Intact images with bytes after their end marker, as phones and copy tools write them.
TRAILERS = {
    "samsung.jpg": lambda jpg, png: jpg + b"\x00\x00SEFH" + b"\x01" * 40 + b"SEFT",  # Samsung's trailer
    "motion.jpg": lambda jpg, png: jpg + b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 4,
    "crlf.jpg": lambda jpg, png: jpg + b"\r\n",
    "ff_fill.jpg": lambda jpg, png: jpg + b"\xff" * 300,
    "newline.png": lambda jpg, png: png + b"\n",
    "long_tail.png": lambda jpg, png: png + bytes(range(256)) * 40,  # past the one block the tail check reads
}
# Truly truncated files, with or without bytes after the cut.
TRUNCATED = {
    "half.jpg": lambda jpg, png: jpg[: len(jpg) // 2],
    "half_crlf.jpg": lambda jpg, png: jpg[: len(jpg) // 2] + b"\r\n",
    "no_eoi.jpg": lambda jpg, png: jpg[:-2],
    "half.png": lambda jpg, png: png[: len(png) // 2],
    "half_newline.png": lambda jpg, png: png[: len(png) // 2] + b"\n",
    "iend_cut.png": lambda jpg, png: png[:-6],  # the pixels whole (Pillow decodes it), DALI refuses it
}


@pytest.mark.parametrize("skip", [False, True])
def test_intact_images_with_trailing_bytes_pass_and_truncated_ones_do_not(tmp_path, skip, capsys):
    """Bytes after EOI/IEND: the file decodes as it is (the same pixels as without them) and is
    kept, with or without --skip-bad-images; a truncated file is still refused or dropped."""
    from automix_fast.data.transforms import load_rgb

    make_folder(tmp_path, per_class=2)
    jpg, png = _encoded("JPEG"), _encoded("PNG")
    for name, edit in {**TRAILERS, **TRUNCATED}.items():
        (tmp_path / "train" / "cat" / name).write_bytes(edit(jpg, png))
        assert (image_problem(str(tmp_path / "train" / "cat" / name)) is None) == (name in TRAILERS), name
    for name in TRAILERS:
        clean = tmp_path / f"clean{name[-4:]}"
        clean.write_bytes(jpg if name.endswith(".jpg") else png)
        assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "train" / "cat" / name))), np.asarray(load_rgb(str(clean))))
    if not skip:
        with pytest.raises(DataError, match=f"^{len(TRUNCATED)} unreadable"):
            resolve_dataset(folder_spec(tmp_path))
        return
    info = resolve_dataset(folder_spec(tmp_path, skip_bad_images=True))
    kept = {os.path.basename(p) for p, _ in info.train_samples}
    assert set(TRAILERS) <= kept and not set(TRUNCATED) & kept
    assert sorted(os.path.basename(p) for p, _ in info.screened_out) == sorted(TRUNCATED)


def test_only_files_without_an_end_marker_are_decoded(tmp_path, monkeypatch):
    """The pre-check stays a header and tail read for intact files: Pillow decodes only a file
    whose last bytes are not its end marker."""
    from automix_fast.data import folder

    decoded = []
    real = folder._decodes
    monkeypatch.setattr(folder, "_decodes", lambda path: decoded.append(os.path.basename(path)) or real(path))
    make_folder(tmp_path, per_class=3)
    (tmp_path / "train" / "cat" / "crlf.jpg").write_bytes(_encoded("JPEG") + b"\r\n")
    (tmp_path / "train" / "cat" / "plain.png").write_bytes(_encoded("PNG"))
    resolve_dataset(folder_spec(tmp_path))
    assert decoded == ["crlf.jpg"]


def test_dali_decodes_images_with_trailing_bytes(tmp_path):
    """What the pre-check now lets through, DALI decodes as Pillow does."""
    from automix_fast.data import dali as dali_mod
    from automix_fast.data.transforms import load_rgb

    if not dali_mod.dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    jpg, png = _encoded("JPEG"), _encoded("PNG")
    paths = []
    for name, edit in TRAILERS.items():
        (tmp_path / name).write_bytes(edit(jpg, png))
        paths.append(str(tmp_path / name))
    for path, image in zip(paths, dali_mod.decode_images(paths)):
        assert np.abs(image.astype(int) - np.asarray(load_rgb(path)).astype(int)).max() <= 16, path
