"""data/torch_loader.py: the resident and streaming loaders' contract (batches, layout,
normalization, every val sample once, disjoint shards, reshuffles, odd files, resampling filters)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from automix_fast.data import DataSpec, DatasetInfo, build_loaders, validate_spec
from automix_fast.data.shards import train_indices
from automix_fast.data.torch_loader import ResidentLoader, StreamingLoader, _ImageDataset, build_torch_loaders
from automix_fast.data.transforms import PIL_FILTERS, draw_cifar_params, resize_center_crop
from automix_fast.errors import ConfigError, DataError
from datakit import (TRAIN_VIEWS, batches_by_label, exif_rotated, expected_cifar, folder_spec, make_folder,
                     pin_train_randomness, resized, rgb, unflipped, waves_info, write_waves)
from tolerances import assert_resampled_like

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


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
    want = _normalize(expected_cifar(info.train_arrays[0], idx, dy.numpy(), dx.numpy(), flip.numpy()))
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), info.train_arrays[1][idx])


def test_resident_reflect_padding_is_torch_reflect_pad_then_crop():
    info = array_info()
    train, _ = loaders_for(info, batch_size=8, seed=5, crop_padding_mode="reflect")
    train.set_epoch(1)
    x, _ = next(iter(train))
    idx = train_indices(40, 8, 5, 1, 0, 1)[:8].numpy()
    dy, dx, flip = draw_cifar_params(train.num_samples, 8, train.shards.aug_generator())
    args = (info.train_arrays[0], idx, dy.numpy(), dx.numpy(), flip.numpy())
    np.testing.assert_allclose(x.numpy(), _normalize(expected_cifar(*args, padding_mode="reflect")), atol=1e-5)
    assert not np.allclose(x.numpy(), _normalize(expected_cifar(*args)), atol=1e-5)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_resident_and_streaming_loaders_pad_alike(mode):
    """The same arrays through the resident loader and the streaming one: the same epoch, pixel for pixel."""
    info = array_info()
    resident, _ = loaders_for(info, batch_size=8, seed=2, crop_padding_mode=mode)
    spec = DataSpec(dataset="cifar10", data_dir="mem", img_size=8, batch_size=8, seed=2, workers=0, mean=MEAN,
                    std=STD, crop_padding_mode=mode)
    validate_spec(spec)
    streaming = StreamingLoader(_ImageDataset(arrays=info.train_arrays, size=8, mode="fixed"), spec, True, "cifar")
    for loader in (resident, streaming):
        loader.set_epoch(4)
    pairs = list(zip(resident, streaming))
    assert len(pairs) == len(resident) == 5
    for (a, ya), (b, yb) in pairs:
        assert torch.equal(ya, yb) and torch.equal(a, b)


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


def _train_loader(kind: str, root, **kw):
    """A training loader of 40 samples, batch 4: resident (cifar-style draws on the device),
    streaming arrays (the same draws, decoded by the DataLoader) or streaming files
    (random-resized crops seeded per sample)."""
    if kind == "resident":
        return loaders_for(array_info(), seed=2, **kw)[0]
    if kind == "streaming arrays":
        spec = DataSpec(dataset="cifar10", data_dir="mem", img_size=8, batch_size=4, seed=2, workers=0, mean=MEAN,
                        std=STD, **kw)
        validate_spec(spec)
        return StreamingLoader(_ImageDataset(arrays=array_info().train_arrays, size=8, mode="fixed"), spec, True, "cifar")
    train, _, _ = build_loaders(folder_spec(root, img_size=16, aug="imagenet", batch_size=4, seed=2, **kw))
    assert isinstance(train, StreamingLoader)
    return train


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", ["resident", "streaming arrays", "streaming files"])
def test_start_at_yields_the_rest_of_the_epoch_without_reading_the_batches_before(tmp_path, monkeypatch, kind, world):
    """set_epoch(e), start_at(k): batches k.. of the epoch, each the very batch (pixels, crops,
    flips, labels) an iteration from batch 0 yields, on every rank, and no sample of batches
    0..k-1 read; the iteration after that starts at batch 0 again."""
    root = make_folder(tmp_path, per_class=20)
    k = 3
    for rank in range(world):
        loader = _train_loader(kind, root, rank=rank, world_size=world)
        loader.set_epoch(3)
        whole = list(loader)
        assert len(whole) == len(loader) == 10 // world
        read = []
        get = _ImageDataset.__getitem__
        monkeypatch.setattr(_ImageDataset, "__getitem__", lambda self, item: read.append(item[2]) or get(self, item))
        loader.set_epoch(3)
        loader.start_at(k)
        rest = list(loader)
        assert len(rest) == len(whole) - k
        for (a, ya), (b, yb) in zip(whole[k:], rest):
            assert torch.equal(ya, yb) and torch.equal(a, b)
        if kind != "resident":  # positions in this rank's epoch: only those of the batches yielded
            assert sorted(read) == list(range(4 * k, 4 * len(whole)))
        monkeypatch.undo()
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(list(loader), whole))


def test_start_at_past_the_epoch_is_refused():
    train, _ = loaders_for(array_info(), batch_size=8)
    with pytest.raises(ValueError, match=r"start_at\(5\): an epoch here has 5 batches"):
        train.start_at(5)


def test_too_small_train_set():
    with pytest.raises(DataError, match="too few"):
        loaders_for(index_info(10), batch_size=8, world_size=2)


def test_resident_folder_resized(tmp_path):
    make_folder(tmp_path, per_class=4, size=(24, 24))
    train, val, info = build_loaders(folder_spec(tmp_path, img_size=16, batch_size=4, eval_batch_size=3))
    assert isinstance(train, ResidentLoader) and train.images.shape == (8, 16, 16, 3)
    assert [tuple(x.shape) for x, _ in val] == [(3, 3, 16, 16)] * 2 + [(2, 3, 16, 16)]

def make_odd_folder(root):
    """Every awkward kind of file: grayscale, CMYK, RGBA and palette PNG, EXIF-rotated, odd sizes."""
    for split in ("train", "val"):
        a, b = root / split / "a", root / split / "b"
        os.makedirs(a), os.makedirs(b)
        Image.fromarray(rgb(37, 23, 0)[..., 0]).convert("L").save(a / "gray.jpg")
        Image.fromarray(rgb(50, 61, 1)).convert("CMYK").save(a / "cmyk.jpg")
        Image.fromarray(np.dstack([rgb(41, 29, 2), np.full((41, 29), 128, np.uint8)])).save(a / "alpha.png")
        pal = Image.fromarray(rgb(30, 30, 3)).convert("P")
        pal.info["transparency"] = 0
        pal.save(b / "pal.png", transparency=0)
        exif_rotated(b / "exif.jpg")
        Image.fromarray(rgb(300, 17, 4)).save(b / "thin.bmp")
        Image.fromarray(rgb(33, 70, 5)).save(b / "wide.webp")


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


@pytest.mark.parametrize("crop_pct,zoomed", [(None, True), (1.0, False)])
def test_eval_crop_pct_sets_the_zoom_of_imagenet_style_eval(tmp_path, crop_pct, zoomed):
    """Default ImageNet-style eval resizes to size / 0.875 before the centre crop; crop_pct 1 evaluates
    the whole image at the training size (the official Tiny-ImageNet test pipeline)."""
    make_folder(tmp_path, per_class=2, size=(16, 16))
    spec = folder_spec(tmp_path, img_size=16, aug="imagenet", eval_batch_size=4, crop_pct=crop_pct, mean=MEAN, std=STD)
    _, val, info = build_loaders(spec)
    x, y = next(iter(val))
    whole = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in info.val_samples])
    same = np.allclose(x.numpy(), _normalize(whole), atol=1e-5)
    assert same is not zoomed


def test_an_eval_zoom_leaves_cifar_style_training_images_whole():
    """crop_pct is the eval view's: the streaming loader it selects trains on the same crops as
    the resident one (pad, crop and flip of the whole image), as DALI does."""
    info = array_info()
    resident, _ = loaders_for(info, batch_size=8, seed=5)
    streaming, _ = loaders_for(info, batch_size=8, seed=5, crop_pct=0.5)
    assert isinstance(resident, ResidentLoader) and isinstance(streaming, StreamingLoader)
    for loader in (resident, streaming):
        loader.set_epoch(2)
    (xr, yr), (xs, ys) = next(iter(resident)), next(iter(streaming))
    assert torch.equal(yr, ys)
    torch.testing.assert_close(xs, xr, atol=1e-6, rtol=0)


def test_cifar_eval_with_a_zoom_leaves_the_resident_loader():
    """Resident arrays hold the training size only, so an eval zoom (crop_pct < 1) streams instead."""
    info = array_info()
    _, val = loaders_for(info, eval_batch_size=64)
    assert isinstance(val, ResidentLoader)
    _, val = loaders_for(info, eval_batch_size=64, crop_pct=0.5)
    assert isinstance(val, StreamingLoader)
    x, _ = next(iter(val))
    assert not np.allclose(x.numpy(), _normalize(info.val_arrays[0]), atol=1e-3)


OTHER_FILTER = {"bilinear": "bicubic", "bicubic": "bilinear"}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("path", TRAIN_VIEWS)
def test_training_images_are_resized_with_train_interpolation(tmp_path, monkeypatch, path, interpolation):
    """Every training resize (the random-resized crop, the CIFAR-style shorter side to img_size,
    resident or streaming) is PIL's with --train-interpolation, whatever --interpolation says;
    randomness pinned (datakit.pin_train_randomness) so the box is the whole image."""
    aug, sizes, crop_pct = TRAIN_VIEWS[path]
    pin_train_randomness(monkeypatch)
    samples = write_waves(tmp_path, sizes)
    spec = DataSpec(dataset="folder", data_dir=str(tmp_path), img_size=32, aug=aug, batch_size=2, workers=0,
                    crop_pct=crop_pct, train_interpolation=interpolation, interpolation=OTHER_FILTER[interpolation],
                    mean=MEAN, std=STD)
    train, _ = build_torch_loaders(spec, waves_info(samples))
    assert isinstance(train, ResidentLoader if path == "resident cifar" else StreamingLoader)
    got = batches_by_label(train, MEAN, STD)
    assert sorted(got) == list(range(len(samples)))
    for (file, i) in samples:
        want = resized(file, 32, aug, interpolation)
        np.testing.assert_allclose(unflipped(got[i], want), want, atol=1e-3, err_msg=os.path.basename(file))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_images_are_resized_with_interpolation(tmp_path, interpolation):
    """The eval resize (shorter side to img_size / 0.875, then the centre crop) is PIL's with
    --interpolation, whatever --train-interpolation says."""
    samples = write_waves(tmp_path, [(101, 77), (77, 101), (50, 50)])
    spec = DataSpec(dataset="folder", data_dir=str(tmp_path), img_size=32, aug="imagenet", batch_size=2, eval_batch_size=2,
                    workers=0, interpolation=interpolation, train_interpolation=OTHER_FILTER[interpolation],
                    mean=MEAN, std=STD)
    _, val = build_torch_loaders(spec, waves_info(samples))
    got = batches_by_label(val, MEAN, STD)
    for (file, i) in samples:
        want = resize_center_crop(Image.open(file).convert("RGB"), 32, 36, interpolation)
        np.testing.assert_allclose(got[i], want, atol=1e-3, err_msg=os.path.basename(file))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("train", [True, False])
def test_resident_arrays_are_resized_with_their_filter(monkeypatch, train, interpolation):
    """In-memory arrays at another size than img_size (CIFAR at 40 px) are resized on the torch
    side with the training or the eval filter: PIL's within resampling tolerance."""
    pin_train_randomness(monkeypatch)
    info = index_info(6, size=24)
    other = OTHER_FILTER[interpolation]
    filters = dict(train_interpolation=interpolation, interpolation=other) if train else \
        dict(train_interpolation=other, interpolation=interpolation)
    spec = DataSpec(dataset="cifar10", data_dir="mem", img_size=40, batch_size=2, eval_batch_size=4, mean=MEAN, std=STD,
                    **filters)
    loader = build_torch_loaders(spec, info)[0 if train else 1]
    assert isinstance(loader, ResidentLoader)
    got = batches_by_label(loader, MEAN, STD)
    images = (info.train_arrays if train else info.val_arrays)[0]
    for i, image in enumerate(images):
        want = np.asarray(Image.fromarray(image).resize((40, 40), PIL_FILTERS[interpolation]))
        assert_resampled_like(unflipped(got[i], want), want, f"image {i}")


def test_an_unknown_filter_is_a_one_line_config_error():
    for field in ("train_interpolation", "interpolation"):
        with pytest.raises(ConfigError) as err:
            validate_spec(DataSpec(**{field: "random"}))
        assert str(err.value) == f"{field}: unknown 'random'; choose from bilinear, bicubic"
