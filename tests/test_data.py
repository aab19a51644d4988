"""Data: dataset resolution, the bad-file policy, CIFAR batches, and the torch loaders' contract."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from automix_fast.data import DataSpec, DatasetInfo, build_loaders, resolve_dataset, validate_spec
from automix_fast.data.folder import image_problem, scan_image_folder
from automix_fast.data.shards import train_indices
from automix_fast.data.torch_loader import ResidentLoader, StreamingLoader, build_torch_loaders
from automix_fast.data.transforms import (cifar_augment, draw_cifar_params, load_rgb,
                                          random_resized_crop_box, resize_center_crop)
from automix_fast.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ----------------------------------------------------------------------------- helpers

def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(32, 32), splits=("train", "val")) -> str:
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(_rgb(size[1], size[0], c * 100 + i)).save(root / split / name / f"{i}.jpg", quality=90)
    return str(root)


def folder_spec(root, **kw) -> DataSpec:
    kw.setdefault("batch_size", 2)
    kw.setdefault("workers", 0)  # tests must not fork workers: the cores are shared
    return DataSpec(dataset="auto", data_dir=str(root), **kw)


def array_info(n_train=40, n_val=23, size=8, num_classes=5) -> DatasetInfo:
    """In-memory data whose label is the sample index mod num_classes and whose pixels encode it."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8)
    val = rng.integers(0, 256, (n_val, size, size, 3), dtype=np.uint8)
    return DatasetInfo(kind="cifar10", root="mem", classes=[str(i) for i in range(num_classes)],
                       train_arrays=(train, np.arange(n_train) % num_classes),
                       val_arrays=(val, np.arange(n_val, dtype=np.int64)))


def loaders_for(info, **kw):
    kw.setdefault("batch_size", 4)
    spec = DataSpec(dataset="cifar10", data_dir="mem", img_size=info.train_arrays[0].shape[1], mean=MEAN, std=STD, **kw)
    validate_spec(spec)
    return build_torch_loaders(spec, info)


def index_info(n, size=8):
    """Val labels are sample indices: lets a test check which samples a loader emitted."""
    info = array_info(n_train=n, n_val=n, size=size)
    info.train_arrays = (info.train_arrays[0], np.arange(n, dtype=np.int64))
    return info


# ----------------------------------------------------------------------------- folders

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
    Image.fromarray(_rgb(8, 8, 1)).save(tmp_path / "train" / "cat" / "sub" / "x.PNG")
    _, samples = scan_image_folder(str(tmp_path / "train"))
    assert sorted(os.path.basename(p) for p, _ in samples) == ["0.jpg", "0.jpg", "x.PNG"]


def test_auto_detects_folder(tmp_path):
    info = resolve_dataset(folder_spec(make_folder(tmp_path)))
    assert info.kind == "folder" and info.classes == ["cat", "dog"] and info.num_train == 6 and info.num_val == 6


@pytest.mark.parametrize("dataset", ["auto", "folder"])
def test_missing_data_dir(tmp_path, dataset):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found.*nowhere"):
        resolve_dataset(DataSpec(dataset=dataset, data_dir=str(missing)))


def test_no_val_folder(tmp_path):
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(DataError, match="val/"):
        resolve_dataset(DataSpec(dataset="folder", data_dir=str(tmp_path)))


def test_unrecognised_dir(tmp_path):
    with pytest.raises(DataError, match="cannot tell"):
        resolve_dataset(folder_spec(tmp_path))


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
    Image.fromarray(_rgb(16, 16, 3)).save(path, quality=90)
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
    Image.fromarray(_rgb(8, 8, 0)).save(p)
    p.write_bytes(p.read_bytes() + b"\x00" * 100)
    assert image_problem(str(p)) is None
    for ext in ("png", "bmp", "webp"):
        q = tmp_path / f"a.{ext}"
        Image.fromarray(_rgb(8, 8, 0)).save(q)
        assert image_problem(str(q)) is None, ext
        q.write_bytes(q.read_bytes()[:-10])
        assert image_problem(str(q)) is not None, ext


# ----------------------------------------------------------------------------- CIFAR

def _write_batch(path, images_nhwc, labels, label_key):
    # The real batches are Python-2 pickles: bytes keys, data as (N, 3072) CHW rows.
    data = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key.encode(): list(labels), b"batch_label": b"x"}, f, protocol=2)


def make_cifar10(root, per_batch=3):
    d = root / "cifar-10-batches-py"
    os.makedirs(d)
    rng = np.random.default_rng(1)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        _write_batch(d / name, x, y, "labels")
        all_x.append(x), all_y.append(y)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return d, all_x, all_y


def test_cifar10_batches_load(tmp_path):
    d, xs, ys = make_cifar10(tmp_path)
    for data_dir in (tmp_path, d):  # the parent or the batches folder itself
        info = resolve_dataset(DataSpec(data_dir=str(data_dir)))
        assert info.kind == "cifar10" and info.classes == [f"c{i}" for i in range(10)]
        x, y = info.train_arrays
        assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, np.concatenate(xs[:5]))
        np.testing.assert_array_equal(y, np.concatenate(ys[:5]))
        np.testing.assert_array_equal(info.val_arrays[0], xs[5])


def test_cifar100_batches_load(tmp_path):
    d = tmp_path / "cifar-100-python"
    os.makedirs(d)
    x = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _write_batch(d / "train", x, [0, 99, 5, 7], "fine_labels")
    _write_batch(d / "test", x[:2], [3, 4], "fine_labels")
    info = resolve_dataset(DataSpec(data_dir=str(tmp_path)))
    assert info.kind == "cifar100" and info.num_classes == 100 and info.num_train == 4 and info.num_val == 2
    assert info.train_arrays[1].tolist() == [0, 99, 5, 7]


def test_cifar_missing_batch_named(tmp_path):
    d, _, _ = make_cifar10(tmp_path)
    os.remove(d / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        resolve_dataset(DataSpec(data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- spec and dispatch

@pytest.mark.parametrize("field,value", [("batch_size", 0), ("img_size", 4), ("loader", "tf"), ("aug", "x"),
                                         ("dataset", "mnist"), ("rank", 2), ("workers", -1), ("eval_batch_size", 0)])
def test_bad_spec_names_field(field, value):
    spec = DataSpec(world_size=2)
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match=field):
        build_loaders(spec)


def test_dali_dispatch_is_lazy(tmp_path, monkeypatch):
    import subprocess

    import automix_fast.data

    calls = []
    monkeypatch.setattr(automix_fast.data, "build_dali_loaders", lambda spec, info: calls.append((spec, info)) or ("T", "V"))
    train, val, info = build_loaders(folder_spec(make_folder(tmp_path), loader="dali"))
    assert (train, val) == ("T", "V") and calls[0][1] is info
    # DALI itself is imported only when a DALI loader is built, not with the data package.
    code = "import sys, automix_fast.data.evalset; print('nvidia.dali' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ----------------------------------------------------------------------------- resident loader

def _expected_cifar(images, idx, dy, dx, flip, pad=4):
    """The augmentation written per image, the slow obvious way."""
    out = []
    for i, j in enumerate(idx):
        p = np.pad(images[j], ((pad, pad), (pad, pad), (0, 0)))
        h, w = images.shape[1:3]
        crop = p[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop[:, ::-1] if flip[i] else crop)
    return np.stack(out)


def test_cifar_augment_matches_per_image():
    x = torch.from_numpy(_rgb(5 * 9, 7, 0).reshape(5, 9, 7, 3).copy())  # non-square on purpose
    dy, dx, flip = draw_cifar_params(5, 9, torch.Generator().manual_seed(3))
    got = cifar_augment(x, dy, dx, flip).numpy()
    np.testing.assert_array_equal(got, _expected_cifar(x.numpy(), range(5), dy.numpy(), dx.numpy(), flip.numpy()))


def _normalize(nhwc):
    x = nhwc.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.array(MEAN, np.float32)[None, :, None, None]) / np.array(STD, np.float32)[None, :, None, None]


def test_resident_train_batch_is_crop_flip_normalize():
    info = array_info()
    train, _ = loaders_for(info, batch_size=8, seed=5)
    assert isinstance(train, ResidentLoader)
    train.set_epoch(3)
    x, y = next(iter(train))
    idx = train_indices(40, 8, 5, 3, 0, 1)[:8].numpy()
    dy, dx, flip = draw_cifar_params(train.num_samples, 8, train.shards.aug_generator())
    want = _normalize(_expected_cifar(info.train_arrays[0], idx, dy.numpy(), dx.numpy(), flip.numpy()))
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), info.train_arrays[1][idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_resident_batch_layout(dtype, channels_last):
    train, val = loaders_for(array_info(), batch_size=8, eval_batch_size=10, dtype=dtype, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for loader, bs in ((train, 8), (val, 10)):
        x, y = next(iter(loader))
        assert x.shape == (bs, 3, 8, 8) and x.dtype == dtype and x.is_contiguous(memory_format=fmt)
        assert y.dtype == torch.int64 and y.shape == (bs,) and x.device.type == "cpu"


def test_val_is_normalized_and_unaugmented():
    info = array_info()
    _, val = loaders_for(info, eval_batch_size=64)
    x, y = next(iter(val))
    np.testing.assert_allclose(x.numpy(), _normalize(info.val_arrays[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bs", [1, 7, 64])
@pytest.mark.parametrize("world", [1, 2])
def test_val_sees_every_sample_once(bs, world):
    n = 23
    seen = []
    for rank in range(world):
        _, val = loaders_for(index_info(n), eval_batch_size=bs, rank=rank, world_size=world)
        labels = [y for _, y in val]
        assert len(labels) == len(val) and sum(len(y) for y in labels) == val.num_samples
        seen += torch.cat(labels).tolist()
    assert sorted(seen) == list(range(n))


def test_train_shards_disjoint_full_batches():
    n, bs = 45, 4
    shards = []
    for rank in range(2):
        train, _ = loaders_for(index_info(n), batch_size=bs, rank=rank, world_size=2, seed=1)
        batches = [y for _, y in train]
        assert len(batches) == len(train) == 5 and all(len(y) == bs for y in batches)
        assert train.num_samples == 20
        shards.append(set(torch.cat(batches).tolist()))
    assert len(shards[0]) == len(shards[1]) == 20 and not shards[0] & shards[1]


def test_set_epoch_reshuffles_deterministically():
    def order(epoch, seed=0):
        train, _ = loaders_for(index_info(40), batch_size=8, seed=seed)
        train.set_epoch(epoch)
        return torch.cat([y for _, y in train]).tolist(), next(iter(train))[0]

    a, xa = order(1)
    b, xb = order(1)
    assert a == b and torch.equal(xa, xb)
    assert order(2)[0] != a and order(1, seed=9)[0] != a
    assert sorted(a) == list(range(40))


def test_too_small_train_set():
    with pytest.raises(DataError, match="too few"):
        loaders_for(index_info(10), batch_size=8, world_size=2)


def test_resident_folder_resized(tmp_path):
    make_folder(tmp_path, per_class=4, size=(24, 24))
    train, val, info = build_loaders(folder_spec(tmp_path, img_size=16, batch_size=4, eval_batch_size=3))
    assert isinstance(train, ResidentLoader) and train.images.shape == (8, 16, 16, 3)
    assert [tuple(x.shape) for x, _ in val] == [(3, 3, 16, 16)] * 2 + [(2, 3, 16, 16)]


# ----------------------------------------------------------------------------- streaming loader

def make_odd_folder(root):
    """Every awkward kind of file: grayscale, CMYK, RGBA and palette PNG, EXIF-rotated, odd sizes."""
    for split in ("train", "val"):
        a, b = root / split / "a", root / split / "b"
        os.makedirs(a), os.makedirs(b)
        Image.fromarray(_rgb(37, 23, 0)[..., 0]).convert("L").save(a / "gray.jpg")
        Image.fromarray(_rgb(50, 61, 1)).convert("CMYK").save(a / "cmyk.jpg")
        Image.fromarray(np.dstack([_rgb(41, 29, 2), np.full((41, 29), 128, np.uint8)])).save(a / "alpha.png")
        pal = Image.fromarray(_rgb(30, 30, 3)).convert("P")
        pal.info["transparency"] = 0
        pal.save(b / "pal.png", transparency=0)
        _exif_rotated(b / "exif.jpg")
        Image.fromarray(_rgb(300, 17, 4)).save(b / "thin.bmp")
        Image.fromarray(_rgb(33, 70, 5)).save(b / "wide.webp")


def _exif_rotated(path):
    """40 wide x 20 high, left half red, right half blue, tagged 'rotate 90 CW to display'."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_load_rgb_applies_exif_orientation(tmp_path):
    _exif_rotated(tmp_path / "e.jpg")
    img = np.asarray(load_rgb(str(tmp_path / "e.jpg")))
    assert img.shape == (40, 20, 3)
    assert img[5, 10, 0] > 200 and img[35, 10, 2] > 200  # the left (red) half is now on top


@pytest.mark.parametrize("img_size,aug", [(48, "imagenet"), (32, "cifar")])
def test_streaming_handles_odd_files(tmp_path, img_size, aug):
    make_odd_folder(tmp_path)
    spec = folder_spec(tmp_path, img_size=img_size, aug=aug, batch_size=3, eval_batch_size=4, channels_last=True)
    train, val, info = build_loaders(spec)
    assert isinstance(train, StreamingLoader) and info.num_train == 7
    batches = [b for b in train]
    assert len(batches) == len(train) == 2
    for x, y in batches + [b for b in val]:
        assert x.shape[1:] == (3, img_size, img_size) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    assert sum(len(y) for _, y in val) == 7
    train.set_epoch(0)
    again = [b for b in train]  # same epoch, same crops: augmentation is seeded per sample
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_random_resized_crop_box_semantics():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 80, rng)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
    assert random_resized_crop_box(1000, 10, rng, scale=(0.9, 1.0)) == (493, 0, 13, 10)  # fallback: centre


def test_resize_center_crop_shapes():
    img = Image.fromarray(_rgb(50, 100, 0))
    assert resize_center_crop(img, 32).shape == (32, 32, 3)
    assert resize_center_crop(img, 32, resize_to=36).shape == (32, 32, 3)
