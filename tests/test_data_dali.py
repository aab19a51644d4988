"""The DALI data path in CPU-only mode (device_id=None, cpu operators): the same pipeline code
that runs with "mixed" decode on a GPU. A tiny corpus is generated with PIL in tmp_path.

Decode parity: DALI (nvImageCodec over libjpeg-turbo on the CPU) is held to PIL within JPEG
decoder tolerance: mean |diff| < 2 levels, max <= 16 (IDCT variants and chroma upsampling
differ between decoders; on the CPU both use libjpeg-turbo and usually agree exactly). CMYK is
held to the same bound: both decoders convert CMYK/YCCK to RGB by the plain
(255 - C) * (255 - K) / 255 formula with no ICC colour management, so they agree; a
colour-managed decoder would not.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from automix_fast.data import DataSpec, DatasetInfo, build_loaders
from automix_fast.data import dali as dali_mod
from automix_fast.errors import ConfigError, DataError
from datakit import TRAIN_VIEWS, batches_by_label, pin_train_randomness, resized, unflipped, waves_info, write_waves
from tolerances import assert_resampled_like

needs_dali = pytest.mark.skipif(not dali_mod.dali_available(), reason="NVIDIA DALI is not installed (pip install \"automix-fast[dali]\")")

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_real_world(folder: str) -> list[str]:
    """Baseline/progressive JPEG, 4:4:4 and 4:2:0, grayscale, CMYK, PNG with alpha, EXIF-rotated, odd sizes."""
    os.makedirs(folder, exist_ok=True)
    im = Image.fromarray(_smooth(53, 37, 0))  # odd size: 37 wide, 53 high
    paths = []

    def save(name, img, **kw):
        path = os.path.join(folder, name)
        img.save(path, **kw)
        paths.append(path)

    save("baseline.jpg", im, quality=95)
    save("progressive.jpg", im, quality=95, progressive=True)
    save("s444.jpg", im, quality=95, subsampling=0)
    save("s420.jpg", Image.fromarray(_smooth(31, 45, 1)), quality=95, subsampling=2)
    save("gray.jpg", im.convert("L"), quality=95)
    save("cmyk.jpg", im.convert("CMYK"), quality=95)
    rgba = np.array(im.convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)[None, :]
    save("alpha.png", Image.fromarray(rgba))
    save("plain.png", Image.fromarray(_smooth(17, 64, 2)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    save("exif6.jpg", im, quality=95, exif=exif.tobytes())
    return paths


@pytest.fixture(scope="module")
def real_world(tmp_path_factory):
    return _write_real_world(str(tmp_path_factory.mktemp("real_world")))


def _color_folder(root: str, per_class: dict[str, int], size=(40, 30)) -> None:
    """Class 'a' images are reddish, class 'b' bluish (noisy), at varied sizes: labels are visible in pixels."""
    rng = np.random.default_rng(0)
    for cls, count in per_class.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(count):
            w, h = size[0] + 3 * i, size[1] + 2 * (i % 4)
            img = rng.normal(60, 15, (h, w, 3))
            img[..., 0 if cls == "a" else 2] += 150
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, cls, f"{i:03d}.jpg"), quality=90)


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("color"))
    _color_folder(os.path.join(root, "train"), {"a": 7, "b": 6})
    _color_folder(os.path.join(root, "val"), {"a": 4, "b": 3})
    return root


def _spec(**kw) -> DataSpec:
    base = dict(img_size=24, batch_size=4, eval_batch_size=5, workers=1, seed=3)
    base.update(kw)
    return DataSpec(**base)


def _indexed(paths):
    """(path, index) samples: the label a loader returns says which file a sample came from."""
    return [(p, i) for i, p in enumerate(paths)]


# ----------------------------------------------------------------------------- availability

def test_missing_dali_is_one_line_config_error(monkeypatch):
    monkeypatch.setattr(dali_mod, "dali_available", lambda: False)
    info = DatasetInfo(kind="folder", root="x", classes=["a"], train_samples=[("x.jpg", 0)], val_samples=[("x.jpg", 0)])
    with pytest.raises(ConfigError) as err:
        dali_mod.build_dali_loaders(_spec(), info)
    msg = str(err.value)
    assert 'pip install "automix-fast[dali]"' in msg and "\n" not in msg


# ----------------------------------------------------------------------------- decoding

@needs_dali
def test_real_world_files_decode_like_pil(real_world):
    decoded = dali_mod.decode_images(real_world)
    assert len(decoded) == len(real_world)
    for path, got in zip(real_world, decoded):
        with Image.open(path) as img:
            ref = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))  # alpha dropped, as DALI does
        name = os.path.basename(path)
        assert got.dtype == np.uint8 and got.shape == ref.shape, f"{name}: {got.shape} vs {ref.shape}"
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < 2.0 and diff.max() <= 16, f"{name}: mean |diff| {diff.mean():.2f}, max {diff.max()}"
    exif = decoded[[os.path.basename(p) for p in real_world].index("exif6.jpg")]
    assert exif.shape == (37, 53, 3)  # EXIF orientation applied: the 37x53 image displays as 53x37


@needs_dali
def test_16_bit_grayscale_decodes_as_dali_decodes_it(tmp_path):
    """The torch loader's decode (load_rgb) and the Pillow copy the DALI loader falls back to
    give DALI's own 8-bit values for a 16-bit grayscale PNG."""
    from automix_fast.data.bad_files import BadFiles
    from automix_fast.data.transforms import load_rgb
    from test_data_transforms import gray16

    path = str(tmp_path / "g16.png")
    gray16(path, seed=1)
    dali, = dali_mod.decode_images([path])
    bad = BadFiles(True, announce=False)
    assert bad.record(path, "stand-in DALI failure", try_pillow=True) == "decoded with Pillow"
    copy, = dali_mod.decode_images([bad.read_path(path)])
    for name, got in (("load_rgb", np.asarray(load_rgb(path))), ("Pillow copy", copy)):
        diff = np.abs(got.astype(np.int16) - dali.astype(np.int16))
        assert got.shape == dali.shape and diff.max() == 0, f"{name}: mean |diff| {diff.mean():.2f}, max {diff.max()}"


@needs_dali
def test_val_pipeline_normalizes_like_reference(tmp_path):
    """Val output of a file already img_size x img_size is exactly its normalized pixels."""
    path = str(tmp_path / "square.png")
    Image.fromarray(_smooth(24, 24, 5)).save(path)
    loader = dali_mod.DaliFolderLoader([(path, 0)], _spec(), train=False, aug="cifar")
    (x, y), = list(loader)
    ref = (np.asarray(Image.open(path).convert("RGB"), np.float64) - MEAN) / STD
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-4)
    assert y.tolist() == [0]


# Sizes whose resized longer side DALI's resize_shorter would round up where the torch loader
# (torchvision) truncates, and margins that are odd, where the anchor's rounding shows.
ODD_MARGINS = {32: [(35, 33), (33, 36), (81, 64), (47, 34)],  # cifar: shorter side to 32, crop 32
               48: [(101, 77), (77, 101), (63, 55), (150, 57)],  # imagenet: shorter side to 54, crop 48
               224: [(300, 257), (257, 300), (341, 256)]}  # imagenet: shorter side to 256, crop 224


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size, aug", [(32, "cifar"), (48, "imagenet"), (224, "imagenet")])
def test_eval_crops_of_both_loaders_are_the_same_pixels(tmp_path, size, aug, interpolation):
    """The DALI eval pipeline resizes and centre-crops as the torch loader does (torchvision's
    Resize + CenterCrop) with the same filter: the same eval tensors within resampling tolerance
    (tolerances.RESAMPLED_LEVELS; measured: mean |diff| <= 0.12 levels, max 4 at a 2x
    downscale); a crop 1 px off gives a mean of 3.8 to 5.7 levels on these waves."""
    from automix_fast.data.evalset import build_eval_loader, resolve_eval_data

    for i, (w, h) in enumerate(ODD_MARGINS[size]):
        os.makedirs(tmp_path / "ab"[i % 2], exist_ok=True)
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        waves = 127.5 + 100 * np.sin(2 * np.pi * x / 11) * np.cos(2 * np.pi * y / 13)  # smooth, yet steep
        img = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), waves], -1)
        Image.fromarray(np.round(img).astype(np.uint8)).save(tmp_path / "ab"[i % 2] / f"{w}x{h}.png")
    info = resolve_eval_data(str(tmp_path))
    got = {}
    for loader in ("torch", "dali"):
        spec = _spec(dataset="folder", data_dir=str(tmp_path), img_size=size, aug=aug, loader=loader, eval_batch_size=3,
                     interpolation=interpolation)
        xs, ys = zip(*build_eval_loader(spec, info))
        got[loader] = torch.cat(xs), torch.cat(ys)
    assert torch.equal(got["torch"][1], got["dali"][1])
    levels = (got["torch"][0] - got["dali"][0]).abs() * torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    for (path, _), diff in zip(info.val_samples, levels):
        assert_resampled_like(diff, np.zeros(diff.shape), os.path.basename(path))


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("path", TRAIN_VIEWS)
def test_training_resizes_of_both_loaders_agree_on_the_filter(tmp_path, monkeypatch, path, interpolation):
    """--train-interpolation in the DALI training pipeline (the resize after the random crop, the
    CIFAR-style shorter side to img_size): PIL's resize with that filter, and the torch loader's,
    within resampling tolerance (tolerances.RESAMPLED_LEVELS); randomness pinned
    (datakit.pin_train_randomness), flips undone. --interpolation is the other filter: unused here."""
    from automix_fast.data.torch_loader import build_torch_loaders

    aug, sizes, crop_pct = TRAIN_VIEWS[path]
    pin_train_randomness(monkeypatch)
    samples = write_waves(tmp_path, sizes)
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[interpolation]
    spec = _spec(dataset="folder", data_dir=str(tmp_path), img_size=32, aug=aug, batch_size=2, crop_pct=crop_pct,
                 train_interpolation=interpolation, interpolation=other, workers=0)
    mean, std = MEAN / 255, STD / 255
    dali = batches_by_label(dali_mod.DaliFolderLoader(samples, _spec(**{**spec.__dict__, "workers": 1}), True, aug),
                            mean, std)
    torch_side = batches_by_label(build_torch_loaders(spec, waves_info(samples))[0], mean, std)
    assert sorted(dali) == sorted(torch_side) == list(range(len(samples)))
    for file, i in samples:
        want = resized(file, 32, aug, interpolation)
        name = f"{os.path.basename(file)} ({interpolation})"
        assert_resampled_like(unflipped(dali[i], want), want, "DALI against PIL: " + name)
        assert_resampled_like(unflipped(dali[i], torch_side[i]), torch_side[i], "DALI against torch: " + name)


# ----------------------------------------------------------------------------- validation: every sample once

@needs_dali
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("world", [1, 2])
def test_val_sees_every_sample_exactly_once(real_world, batch, world):
    samples = _indexed(real_world)  # 9 files: odd counts per shard, partial batches
    seen = []
    for rank in range(world):
        loader = dali_mod.DaliFolderLoader(samples, _spec(eval_batch_size=batch, rank=rank, world_size=world), False, "imagenet")
        for epoch in range(2):  # the pipeline is reused across epochs: the second must repeat the first
            loader.set_epoch(epoch)
            labels = [y for _, y in loader]
            assert len(labels) == len(loader)
            got = torch.cat(labels).tolist()
            assert len(got) == loader.num_samples
            if epoch == 0:
                first = got
                seen.extend(got)
            else:
                assert got == first
    assert sorted(seen) == list(range(len(samples)))


@needs_dali
def test_val_restarts_cleanly_after_an_abandoned_epoch(real_world):
    loader = dali_mod.DaliFolderLoader(_indexed(real_world), _spec(eval_batch_size=2), False, "imagenet")
    it = iter(loader)
    next(it)
    del it  # the consumer stopped after one batch; DALI had prefetched more
    assert torch.cat([y for _, y in loader]).tolist() == list(range(len(real_world)))


# ----------------------------------------------------------------------------- training batches

@needs_dali
@pytest.mark.parametrize("aug", ["imagenet", "cifar"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batches_shape_layout_normalization_labels(color_data, aug, channels_last):
    spec = _spec(dataset="folder", data_dir=color_data, loader="dali", aug=aug, channels_last=channels_last)
    train, val, info = build_loaders(spec)
    assert isinstance(train, dali_mod.DaliFolderLoader)
    assert info.classes == ["a", "b"] and len(train) == 13 // 4 and train.num_samples == 12
    count = 0
    for x, y in train:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert y.dtype == torch.int64 and y.shape == (4,)
        assert -3.0 < float(x.mean()) < 3.0 and float(x.abs().max()) < 3.0  # normalized, not 0..255
        red_minus_blue = x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))
        assert torch.equal((red_minus_blue < 0).long(), y), (red_minus_blue, y)  # a = red = 0, b = blue = 1
        count += x.shape[0]
    assert count == train.num_samples
    vx, vy = next(iter(val))
    assert vx.shape == (5, 3, 24, 24) and vy.tolist() == [0, 0, 0, 0, 1]


@needs_dali
@pytest.mark.parametrize("gpu", [False, pytest.param(True, marks=pytest.mark.gpu)])  # gpu: `pytest -m gpu`
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_pad_crop_is_torch_pad_then_crop_at_fixed_offsets(mode, gpu):
    """The DALI crop of the cifar aug at every (dy, dx), against torch's pad (constant 0, or
    mode='reflect') then the crop, on random non-uniform images, with cpu or gpu operators."""
    from nvidia.dali import fn, pipeline_def, types

    from automix_fast.data import dali_pipelines as P
    from datakit import expected_cifar

    size, pad = 9, P.CIFAR_PAD
    offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    images = np.random.default_rng(4).integers(0, 256, (len(offsets), size, size, 3), dtype=np.uint8)
    shifts = np.array(offsets, np.int32) - pad

    @pipeline_def(batch_size=len(offsets), num_threads=1, device_id=torch.cuda.current_device() if gpu else None)
    def crops():
        x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC", dtype=types.UINT8)
        shift = fn.external_source(source=lambda: list(shifts), batch=True, dtype=types.INT32)
        return P.pad_crop(x.gpu() if gpu else x, shift, size, mode)

    pipe = crops()
    pipe.build()
    out, = pipe.run()
    out = out.as_cpu() if gpu else out
    got = np.stack([np.array(out[i]) for i in range(len(offsets))])
    dy, dx = (shifts + pad).T
    want = expected_cifar(images, range(len(offsets)), dy, dx, np.zeros(len(offsets), bool), padding_mode=mode)
    np.testing.assert_array_equal(got, want)


def _square_pngs(root, size: int, count: int):
    """Random size x size PNGs (lossless, no resize in the pipeline): the loaders' pixels are exact."""
    rng = np.random.default_rng(7)
    os.makedirs(root, exist_ok=True)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(root, f"{i:02d}.png"))
    return images


@needs_dali
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_dali_train_crops_are_the_torch_loaders_crops(tmp_path, mode):
    """DALI draws its own offsets, so each DALI training image is matched against the torch
    augmentation (cifar_augment) of its source at every offset and flip: one must be it."""
    from automix_fast.data.transforms import cifar_augment

    size = 12
    images = _square_pngs(str(tmp_path), size, 8)
    samples = [(os.path.join(str(tmp_path), f"{i:02d}.png"), i) for i in range(8)]
    loader = dali_mod.DaliFolderLoader(samples, _spec(img_size=size, crop_padding_mode=mode, batch_size=8), True, "cifar")
    (x, y), = list(loader)
    seen = x.permute(0, 2, 3, 1).numpy() * STD + MEAN  # back to levels
    grid = torch.arange(9)
    dy, dx, flip = grid.repeat_interleave(18), grid.repeat_interleave(2).repeat(9), torch.tensor([False, True]).repeat(81)
    bordered = 0
    for got, label in zip(seen, y.tolist()):
        source = torch.from_numpy(images[label]).expand(len(dy), size, size, 3)
        candidates = cifar_augment(source, dy, dx, flip, padding_mode=mode).numpy().astype(np.float64)
        error = np.abs(candidates - got).reshape(len(dy), -1).max(1)
        match = int(error.argmin())
        assert error[match] < 0.01, f"{label}: no torch crop within {error[match]:.3f} levels"
        bordered += (int(dy[match]), int(dx[match])) != (4, 4)
    assert bordered > 0  # some offsets reach into the padding


@needs_dali
def test_train_order_is_a_function_of_seed_and_epoch_and_shards_are_disjoint(real_world):
    samples = _indexed(real_world * 3)  # 27 samples

    def epoch_labels(rank, world, epoch, seed=3):
        loader = dali_mod.DaliFolderLoader(samples, _spec(batch_size=4, rank=rank, world_size=world, seed=seed), True, "imagenet")
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    first = epoch_labels(0, 1, 0)
    assert len(first) == 24 and len(set(first)) == 24  # 27 // 4 whole batches, no repeats
    assert epoch_labels(0, 1, 0) == first  # a new loader (and pipeline) repeats epoch 0
    assert epoch_labels(0, 1, 1) != first
    assert epoch_labels(0, 1, 0, seed=4) != first
    r0, r1 = epoch_labels(0, 2, 5), epoch_labels(1, 2, 5)
    assert len(r0) == len(r1) == 12 and not set(r0) & set(r1)  # 27 // 2 = 13 -> 3 batches of 4 each


@needs_dali
def test_set_epoch_on_a_live_loader_matches_a_fresh_one(real_world):
    samples = _indexed(real_world * 2)
    live = dali_mod.DaliFolderLoader(samples, _spec(), True, "cifar")
    for epoch in range(3):
        live.set_epoch(epoch)
        got = torch.cat([y for _, y in live]).tolist()
    fresh = dali_mod.DaliFolderLoader(samples, _spec(), True, "cifar")
    fresh.set_epoch(2)
    assert torch.cat([y for _, y in fresh]).tolist() == got


@needs_dali
@pytest.mark.parametrize("isolated", [True, False])
def test_start_at_feeds_the_rest_of_the_epoch_and_no_file_before_it(real_world, monkeypatch, isolated):
    """start_at(k) plans batches k.. of the epoch (in the decoding process or in this one): no
    file of batches 0..k-1 reaches the pipeline; the training batches hold the uninterrupted
    epoch's samples (their crops are the pipeline's next draws, dali.py), the deterministic val
    batches its very pixels; the next iteration starts at batch 0."""
    monkeypatch.setattr(dali_mod, "ISOLATE_CPU", isolated)
    fed = []
    planned = dali_mod.DaliFolderLoader._planned

    def spy(self, batches, first):
        for k, idx in planned(self, batches, first):
            fed.append(k)
            yield k, idx

    monkeypatch.setattr(dali_mod.DaliFolderLoader, "_planned", spy)
    samples = _indexed(real_world * 3)  # 27 samples: 6 train batches of 4, 6 val batches of 5
    for train, k in ((True, 4), (False, 2)):
        loader = dali_mod.DaliFolderLoader(samples, _spec(), train, "imagenet")
        loader.set_epoch(2)
        whole = list(loader)
        fed.clear()
        loader.set_epoch(2)
        loader.start_at(k)
        rest = list(loader)
        assert sorted(set(fed)) == list(range(k, 6))
        assert [y.tolist() for _, y in rest] == [y.tolist() for _, y in whole[k:]]
        if not train:
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, whole[k:]))
        assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in whole]


@needs_dali
def test_too_few_training_images_is_a_data_error(real_world):
    with pytest.raises(DataError, match="too few"):
        dali_mod.DaliFolderLoader(_indexed(real_world), _spec(batch_size=5, world_size=2), True, "imagenet")


# ----------------------------------------------------------------------------- bad files, in-memory data

@needs_dali
def test_bad_files_refused_or_skipped_before_the_pipeline(color_data, tmp_path):
    import shutil

    root = str(tmp_path / "data")
    shutil.copytree(color_data, root)
    good = os.path.join(root, "train", "a", "000.jpg")
    data = open(good, "rb").read()
    with open(os.path.join(root, "train", "a", "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "train", "b", "garbage.jpg"), "wb") as f:
        f.write(b"not an image at all")
    spec = _spec(dataset="folder", data_dir=root, loader="dali")
    with pytest.raises(DataError) as err:
        build_loaders(spec)
    assert "truncated.jpg" in str(err.value) and "\n" not in str(err.value)
    spec = _spec(dataset="folder", data_dir=root, loader="dali", skip_bad_images=True)
    train, _, info = build_loaders(spec)
    assert len(info.train_samples) == 13
    assert sum(x.shape[0] for x, _ in train) == train.num_samples == 12


@needs_dali
def test_in_memory_arrays_go_to_the_resident_loader():
    from automix_fast.data.torch_loader import ResidentLoader

    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10)
    info = DatasetInfo(kind="cifar10", root="mem", classes=[str(i) for i in range(10)], train_arrays=arrays, val_arrays=arrays)
    train, val = dali_mod.build_dali_loaders(_spec(img_size=32, channels_last=True), info)
    assert isinstance(train, ResidentLoader) and isinstance(val, ResidentLoader)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- GPU (mixed decode)

@needs_dali
@pytest.mark.gpu  # selected by `pytest -m gpu` (bench/gpu_check.sh); skipped without CUDA by conftest
def test_gpu_mixed_decode_and_loader(real_world, color_data):
    decoded = dali_mod.decode_images(real_world, device_id=torch.cuda.current_device())
    for path, got in zip(real_world, decoded):
        with Image.open(path) as img:
            ref = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        assert got.shape == ref.shape and diff.mean() < 3.0, f"{os.path.basename(path)}: mean |diff| {diff.mean():.2f}"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        spec = _spec(dataset="folder", data_dir=color_data, loader="dali", device=torch.device("cuda"), dtype=dtype,
                     channels_last=True, aug="imagenet")
        train, val, _ = build_loaders(spec)
        for loader in (train, val):
            x, y = next(iter(loader))
            assert x.is_cuda and y.is_cuda and x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)


def test_the_dali_gpu_test_carries_the_gpu_marker():
    import test_data_dali

    assert "gpu" in [m.name for m in test_data_dali.test_gpu_mixed_decode_and_loader.pytestmark]
