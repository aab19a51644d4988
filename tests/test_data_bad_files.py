"""Files that fail to decode in the middle of a run: DALI rejects them, Pillow rejects
them, or they change after the pre-check. Each is found, named once, decoded with Pillow or left
out; the epoch goes on with nothing else skipped or repeated. Tiny corpora built by tests/oddkit.py;
DALI in CPU-only mode.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from automix_fast.data import DataSpec, build_loaders
from automix_fast.data import dali as dali_mod
from automix_fast.data.bad_files import LEFT_OUT, PILLOW, REPAIRED, BadFiles
from automix_fast.data.jpeg_header import header_problem, repaired
from automix_fast.errors import DataError
from oddkit import (BENIGN_EDITS, ODD_EDITS, SCREENED_UNREADABLE, UNREADABLE_EDITS, jpeg_bytes, mutate, picture, pil_decodes, png_bytes,
                    write)

needs_dali = pytest.mark.skipif(not dali_mod.dali_available(), reason="NVIDIA DALI is not installed")


def _spec(**kw) -> DataSpec:
    base = dict(img_size=16, batch_size=4, eval_batch_size=4, workers=1, seed=3, skip_bad_images=True)
    base.update(kw)
    return DataSpec(**base)


def _files(folder, n: int, seed: int = 0) -> list[str]:
    return [write(os.path.join(folder, f"{i:03d}.jpg"), jpeg_bytes(picture(18, 20 + i % 3, seed + i))) for i in range(n)]


def _dali(paths, train: bool, bad=None, **kw):
    """A DALI loader whose labels are file indices, so a batch says which files it holds."""
    return dali_mod.DaliFolderLoader([(p, i) for i, p in enumerate(paths)], _spec(**kw), train, "cifar", bad if bad is not None else BadFiles(True))


def _epoch(loader, epoch: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [y.tolist() for _, y in loader]


def _without(batches: list[list[int]], gone: set[int]) -> list[list[int]]:
    return [[i for i in b if i not in gone] for b in batches]


# ----------------------------------------------------------------------------- the oddities themselves

@needs_dali
def test_oddities_decode_with_pillow_but_not_dali(tmp_path):
    """What DALI 2.4's CPU decoder really rejects among the real-world oddities (see oddkit)."""
    base = jpeg_bytes(picture(20, 24, 0))
    for name, edit in {**ODD_EDITS, **BENIGN_EDITS, **UNREADABLE_EDITS}.items():
        path = write(str(tmp_path / f"{name}.jpg"), edit(base))
        dali_ok = True
        try:
            dali_mod.decode_images([path])
        except RuntimeError:
            dali_ok = False
        assert pil_decodes(path) == (name not in UNREADABLE_EDITS), name
        assert dali_ok == (name in BENIGN_EDITS), name


def test_header_screening_flags_exactly_the_oddities_and_repairs_them(tmp_path):
    img = picture(20, 24, 1)
    base = jpeg_bytes(img)
    for name, edit in {**ODD_EDITS, **BENIGN_EDITS, **UNREADABLE_EDITS}.items():
        path = write(str(tmp_path / f"{name}.jpg"), edit(base))
        assert (header_problem(path) is not None) == (name in ODD_EDITS or name in SCREENED_UNREADABLE), name
        if name in ODD_EDITS:
            assert repaired(path) == base  # the stray bytes dropped, nothing else touched
    assert header_problem(write(str(tmp_path / "x.png"), png_bytes(img))) is None
    exif = __import__("PIL.Image", fromlist=["Exif"]).Exif()
    exif[0x0112] = 6
    for name, im, kw in [("ok", img, {}), ("progressive", img, dict(progressive=True)), ("s444", img, dict(subsampling=0)),
                         ("gray", img.convert("L"), {}), ("cmyk", img.convert("CMYK"), {}),
                         ("exif", img, dict(exif=exif.tobytes())), ("optimized", img, dict(optimize=True))]:
        assert header_problem(write(str(tmp_path / f"{name}.jpg"), jpeg_bytes(im, **kw))) is None, name  # no false alarms
    damaged = write(str(tmp_path / "damaged.jpg"), UNREADABLE_EDITS["bogus_huffman"](base))
    assert "Huffman" in header_problem(damaged) and repaired(damaged) is None  # not repairable: Pillow or left out


# ----------------------------------------------------------------------------- DALI loader

@needs_dali
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_dali_odd_file_in_a_batch_is_decoded_with_pillow_and_nothing_moves(tmp_path, where):
    paths = _files(tmp_path / "clean", 13)
    clean = _epoch(_dali(paths, True))  # 3 batches of 4 (one image dropped by the epoch plan)
    flat = [i for b in clean for i in b]
    target = {"first": clean[0][0], "middle": clean[1][2], "last": clean[-1][-1]}[where]
    odd = list(paths)
    odd[target] = write(str(tmp_path / "odd" / "x.jpg"), ODD_EDITS["ff00_header"](open(paths[target], "rb").read()))
    bad = BadFiles(True, announce=False)
    loader = _dali(odd, True, bad)
    assert _epoch(loader) == clean  # same files, same order, same batches: the odd one decoded by Pillow
    assert bad.entries[odd[target]][0] == PILLOW and bad.recoveries == 1
    assert _epoch(loader, 1) == _epoch(_dali(paths, True), 1)  # next epoch: read from the copy, no failure
    assert bad.recoveries == 1 and len(flat) == 12


@needs_dali
def test_dali_unreadable_files_are_left_out_train_and_val(tmp_path, capsys):
    paths = _files(tmp_path, 14)
    clean_train = _epoch(_dali(paths, True))
    clean_val = _epoch(_dali(paths, False))
    gone = {clean_train[0][1], clean_train[2][3], clean_val[-1][-1]}
    for i in gone:
        write(paths[i], UNREADABLE_EDITS["sof_zero_height"](open(paths[i], "rb").read()))
    bad = BadFiles(True)
    train, val = _dali(paths, True, bad), _dali(paths, False, bad)
    assert _epoch(train) == _without(clean_train, gone)  # holes where they were, nothing else moved
    seen = _epoch(val)
    assert sorted(i for b in seen for i in b) == sorted(set(range(14)) - gone)  # every readable one, once
    assert {p for p in bad.left_out} == {paths[i] for i in gone}
    assert _epoch(train, 0) == _without(clean_train, gone)  # again: planned around, no failure
    err = capsys.readouterr().err
    for i in gone:
        assert err.count(paths[i]) == 1  # named once
    assert "Traceback" not in err


@needs_dali
def test_dali_a_file_deleted_during_the_run(tmp_path):
    paths = _files(tmp_path, 9)
    bad = BadFiles(True, announce=False)
    val = _dali(paths, False, bad)
    assert len([i for b in _epoch(val) for i in b]) == 9
    os.remove(paths[4])
    assert sorted(i for b in _epoch(val) for i in b) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert bad.entries[paths[4]][0] == LEFT_OUT and "file.read" in bad.entries[paths[4]][1]


@needs_dali
def test_dali_batch_of_only_unreadable_files(tmp_path):
    paths = _files(tmp_path, 8)
    clean = _epoch(_dali(paths, True))
    for i in clean[1]:  # every file of the second training batch
        write(paths[i], UNREADABLE_EDITS["bogus_huffman"](open(paths[i], "rb").read()))
    got = _epoch(_dali(paths, True))
    assert got[0] == clean[0] and len(got) == 2 and got[1] == clean[0]  # refilled from the epoch's first readable files


# ----------------------------------------------------------------------------- torch loader

def _torch(paths, train: bool, bad=None, **kw):
    from automix_fast.data.torch_loader import StreamingLoader, _ImageDataset

    spec = _spec(**{"workers": 0, **kw})
    ds = _ImageDataset(samples=[(p, i) for i, p in enumerate(paths)], size=16, mode="fixed", resize_to=16)
    return StreamingLoader(ds, spec, train, "cifar", bad if bad is not None else BadFiles(True))


@pytest.mark.parametrize("damage", ["truncate", "delete", "chmod"])
def test_torch_file_broken_after_the_check_is_left_out(tmp_path, damage, capsys):
    if damage == "chmod" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    paths = _files(tmp_path, 13)
    clean = _epoch(_torch(paths, True))
    target = clean[1][1]
    bad = BadFiles(True)
    loader = _torch(paths, True, bad)
    if damage == "truncate":
        data = open(paths[target], "rb").read()
        write(paths[target], data[: len(data) // 3])
    elif damage == "delete":
        os.remove(paths[target])
    else:
        os.chmod(paths[target], 0)
    assert _epoch(loader) == _without(clean, {target})
    assert bad.left_out == {paths[target]}
    assert capsys.readouterr().err.count(paths[target]) == 1
    val = _torch(paths, False, bad)
    assert sorted(i for b in _epoch(val) for i in b) == sorted(set(range(13)) - {target})


# ----------------------------------------------------------------------------- the fuzzer

def _fuzz_corpus(folder, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = picture(18, 20, seed * 100 + i)
        data = png_bytes(img) if i % 3 == 2 else jpeg_bytes(img, progressive=bool(i % 2))
        paths.append(write(os.path.join(folder, f"{i:03d}.{'png' if i % 3 == 2 else 'jpg'}"), mutate(data, rng)))
    return paths


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=needs_dali), "torch"])
def test_fuzzed_files_are_trained_on_or_named_and_left_out(tmp_path, loader, capsys):
    from automix_fast.data.folder import image_problem

    paths = [p for p in _fuzz_corpus(tmp_path, 40, seed=7) if image_problem(p) is None]  # the pre-check's share
    assert len(paths) >= 24
    make = _dali if loader == "dali" else _torch
    bad = BadFiles(True)
    train, val = make(paths, True, bad), make(paths, False, bad)
    for epoch in range(2):
        batches = _epoch(train, epoch)
        seen_val = [i for b in _epoch(val) for i in b]
        left = {i for i, p in enumerate(paths) if p in bad.left_out}
        assert sorted(seen_val) == sorted(set(range(len(paths))) - left)  # val: each readable file once
        planned = np.asarray(train.indices() if loader == "dali" else train.shards.indices()).tolist()
        assert len(batches) == len(train) and all(batches)  # every step gets a batch: ranks stay in step
        assert {i for b in batches for i in b} == set(planned) - left  # every readable file trained on
        if epoch == 1:  # all known now: holes where the bad files were, refills only for all-bad batches
            readable = [i for i in planned if i not in left]
            chunks = [planned[k:k + 4] for k in range(0, len(planned), 4)]
            assert batches == [[i for i in c if i not in left] or readable[:len(c)] for c in chunks]
    if loader == "torch":
        assert bad.left_out == {p for p in paths if not pil_decodes(p)}
    err = capsys.readouterr().err
    assert all(err.count(p) == 1 for p in bad.entries) and "Traceback" not in err


# ----------------------------------------------------------------------------- whole runs (CLI)

def _odd_run_folder(root, unreadable: int = 0):
    """oddkit.odd_folder (one file in ten DALI rejects) plus `unreadable` files no decoder reads."""
    from oddkit import odd_folder

    odd = odd_folder(str(root), per_class=15, size=32)
    broken = []
    for k in range(unreadable):
        path = os.path.join(str(root), "train", "ab"[k % 2], f"{k:03d}.jpg")  # not one of the odd ones
        write(path, UNREADABLE_EDITS["undefined_huffman"](open(path, "rb").read()))  # found mid-run
        broken.append(path)
    return odd, broken


def _data_records(run_dir):
    from faultkit import records

    return [r["values"] for r in records(run_dir, "data")]


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=needs_dali), "torch"])
def test_one_odd_file_in_ten_trains_to_the_end(tmp_path, loader):
    from faultkit import cli, records, train_args

    odd, _ = _odd_run_folder(tmp_path / "data")
    run = cli(train_args(tmp_path / "data", tmp_path, "r", "--mix", "mixup", "--loader", loader, "--workers", "1", batch=6))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    assert records(tmp_path / "r", "eval")[-1]["values"]["count"] == 14  # every val image, odd ones included
    if loader == "torch":  # Pillow reads them all: nothing to name
        assert not (tmp_path / "r" / "bad_images.txt").exists()
        return
    for path in odd:
        assert run.stderr.count(path) == 1, path  # named once, over both epochs
    listed = (tmp_path / "r" / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(odd)
    assert all(line.split("\t")[1] == REPAIRED for line in listed)  # screened before any pipeline ran
    counts = _data_records(tmp_path / "r")
    assert counts[-1]["bad_images"] == len(odd) and counts[-1]["header_repaired"] == len(odd)
    assert counts[-1]["pipeline_recoveries"] == 0


@needs_dali
def test_without_skip_the_run_stops_after_the_epoch_and_resumes_with_skip(tmp_path):
    from faultkit import cli, records, train_args

    odd, broken = _odd_run_folder(tmp_path / "data", unreadable=2)
    args = train_args(tmp_path / "data", tmp_path, "r", "--mix", "mixup", "--loader", "dali", "--workers", "1", batch=6)
    first = cli(args)
    assert first.returncode == 2, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(p in last for p in broken) and "--skip-bad-images" in last
    assert "Traceback" not in first.stderr
    assert (tmp_path / "r" / "last.pt").exists() and len(records(tmp_path / "r", "eval")) == 1  # epoch 1 finished
    # Resuming without the flag is refused at once; with it, the listed files are planned around from the start.
    again = cli(args + ["--resume", "auto"])
    assert again.returncode == 2 and "bad_images.txt" in again.stderr and "Traceback" not in again.stderr
    resumed = cli(args + ["--resume", "auto", "--skip-bad-images"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(p in first.stderr for p in odd + broken)
    assert all(p not in resumed.stderr for p in odd + broken)  # known from bad_images.txt: not named again
    assert len(records(tmp_path / "r", "eval")) == 2


@needs_dali
def test_two_ranks_agree_on_the_skip_list_and_stay_in_step(tmp_path):
    import torch

    from faultkit import assert_states_equal, torchrun, train_args, weights

    odd, broken = _odd_run_folder(tmp_path / "data", unreadable=4)
    dump = tmp_path / "ranks"
    run = torchrun(2, train_args(tmp_path / "data", tmp_path, "r", "--mix", "mixup", "--loader", "dali", "--workers", "1",
                                 "--skip-bad-images", batch=4), env={"AUTOMIX_FAST_RANK_STATE_DIR": str(dump)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cpu x2" in run.stdout and "Traceback" not in run.stderr
    listed = dict(line.split("\t")[:2] for line in (tmp_path / "r" / "bad_images.txt").read_text().splitlines())
    assert listed == {**{p: REPAIRED for p in odd}, **{p: LEFT_OUT for p in broken}}  # found by either rank: all listed
    for path in odd + broken:
        assert run.stderr.count(path) == 1, path  # named once, by rank 0, whichever rank found it
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert_states_equal(r0, r1, keys=[k for k in r0 if "running" not in k and "num_batches" not in k])
    assert_states_equal(weights(tmp_path / "r" / "last.pt"), r0, keys=[k for k in r0 if "running" not in k])


@needs_dali
def test_dali_abandoned_epoch_with_a_failing_prefetched_batch(tmp_path):
    """An epoch left after its first batch (as the mask grid does with the val loader) while a
    prefetched batch holds a failing file: the next epoch still starts cleanly."""
    paths = _files(tmp_path, 12)
    clean = _epoch(_dali(paths, False))
    write(paths[clean[1][0]], UNREADABLE_EDITS["bogus_huffman"](open(paths[clean[1][0]], "rb").read()))
    bad = BadFiles(True, announce=False)
    val = _dali(paths, False, bad)
    first = next(iter(val))[1].tolist()
    assert first == clean[0]
    assert _epoch(val) == _without(clean, {clean[1][0]})
    assert bad.left_out == {paths[clean[1][0]]}


def test_torch_batch_of_only_unreadable_files_is_refilled(tmp_path):
    paths = _files(tmp_path, 8)
    clean = _epoch(_torch(paths, True))
    for i in clean[1]:
        data = open(paths[i], "rb").read()
        write(paths[i], data[: len(data) // 4])
    bad = BadFiles(True, announce=False)
    got = _epoch(_torch(paths, True, bad))
    assert got == [clean[0], clean[0]]  # the step keeps a batch: the epoch's first readable files
    assert bad.left_out == {paths[i] for i in clean[1]}


@pytest.mark.parametrize("skip", [True, False])
def test_torch_resident_folder_with_a_file_pillow_cannot_decode(tmp_path, skip, capsys):
    from oddkit import odd_folder

    root = tmp_path / "data"
    odd_folder(str(root), per_class=6, size=16, every=1000)  # no oddities: a clean tiny folder
    broken = os.path.join(str(root), "train", "a", "002.jpg")
    write(broken, UNREADABLE_EDITS["bogus_huffman"](open(broken, "rb").read()))
    spec = _spec(dataset="folder", data_dir=str(root), loader="torch", skip_bad_images=skip)
    if not skip:
        with pytest.raises(DataError) as e:
            build_loaders(spec)
        assert broken in str(e.value) and "--skip-bad-images" in str(e.value) and "\n" not in str(e.value)
        return
    train, val, info = build_loaders(spec)
    assert type(train).__name__ == "ResidentLoader" and len(train.labels) == 11
    assert info.bad_files.left_out == {broken} and capsys.readouterr().err.count(broken) == 1


@needs_dali
def test_fuzzed_folder_trains_to_the_end_and_counts_add_up(tmp_path):
    """A whole DALI run over a folder where every third file is fuzzed: it finishes, each file it
    could not use is named once, and the val count is every val file minus those left out."""
    from faultkit import cli, records, train_args

    from automix_fast.data.folder import image_problem

    rng = np.random.default_rng(11)
    root = tmp_path / "data"
    files = []
    for split, n in (("train", 24), ("val", 9)):
        for c, cls in enumerate("ab"):
            for i in range(n):
                img = picture(16, 18, 1000 * c + i + (500 if split == "val" else 0), tint=2 * c)
                data = png_bytes(img) if i % 2 else jpeg_bytes(img)
                if i % 3 == 1:
                    data = mutate(data, rng)
                files.append(write(str(root / split / cls / f"{i:03d}.{'png' if i % 2 else 'jpg'}"), data))
    precheck = {p for p in files if image_problem(p) is not None}  # dropped before training (--skip-bad-images)
    run = cli(train_args(root, tmp_path, "r", "--mix", "mixup", "--loader", "dali", "--workers", "1",
                         "--skip-bad-images", batch=6))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    listed = {}
    if (tmp_path / "r" / "bad_images.txt").exists():
        listed = dict(line.split("\t")[:2] for line in (tmp_path / "r" / "bad_images.txt").read_text().splitlines())
    for path in listed:
        assert run.stderr.count(path) == 1, [ln for ln in run.stderr.splitlines() if path in ln]
    val_files = [p for p in files if "/val/" in p and p not in precheck]
    left_val = [p for p in val_files if listed.get(p) == LEFT_OUT]
    assert records(tmp_path / "r", "eval")[-1]["values"]["count"] == len(val_files) - len(left_val)


@needs_dali
@pytest.mark.gpu
def test_gpu_mixed_decoder_failures_are_handled(tmp_path):
    """The same handling with the GPU ("mixed", nvJPEG) decoder: an odd header is screened, a file
    no decoder reads is found mid-run, and the epoch goes on (runs only where CUDA is)."""
    import torch

    paths = _files(tmp_path, 16)
    write(paths[3], ODD_EDITS["app_len_0"](open(paths[3], "rb").read()))
    write(paths[9], UNREADABLE_EDITS["undefined_huffman"](open(paths[9], "rb").read()))
    bad = BadFiles(True, announce=False)
    dali_mod.screen_jpeg_headers(paths, bad)
    assert bad.entries[paths[3]][0] == REPAIRED
    val = _dali(paths, False, bad, device=torch.device("cuda"))
    seen = sorted(i for b in _epoch(val) for i in b)
    assert seen == [i for i in range(16) if i != 9] and bad.left_out == {paths[9]}


@needs_dali
@pytest.mark.parametrize("skip", [True, False])
def test_dali_screening_finds_an_undecodable_header_before_training(tmp_path, skip):
    from oddkit import odd_folder

    root = tmp_path / "data"
    odd_folder(str(root), per_class=6, size=16, every=1000)
    broken = os.path.join(str(root), "val", "b", "001.jpg")
    write(broken, SCREENED_UNREADABLE["sof_zero_height"](open(broken, "rb").read()))
    spec = _spec(dataset="folder", data_dir=str(root), loader="dali", skip_bad_images=skip)
    if not skip:
        with pytest.raises(DataError, match="--skip-bad-images") as e:
            build_loaders(spec)
        assert broken in str(e.value)
        return
    _, val, info = build_loaders(spec)
    assert info.bad_files.left_out == {broken}
    assert sum(len(y) for _, y in val) == 5  # 6 val images, the broken one left out from the start


@needs_dali
def test_dali_batch_of_32_with_oddities_and_a_mid_run_failure(tmp_path):
    """At batch 32 a DALI 2.4 parser error can crash the process (see jpeg_header.py): the screened
    oddities never reach a pipeline, and the mid-run failure (past the parser) is recovered."""
    from oddkit import odd_folder

    root = tmp_path / "data"
    odd = odd_folder(str(root), per_class=40, size=16)
    broken = os.path.join(str(root), "train", "b", "007.jpg")
    write(broken, UNREADABLE_EDITS["undefined_huffman"](open(broken, "rb").read()))
    spec = _spec(dataset="folder", data_dir=str(root), loader="dali", batch_size=32, eval_batch_size=32, workers=2)
    train, val, info = build_loaders(spec)
    for epoch in range(2):
        train.set_epoch(epoch)
        sizes = [len(y) for _, y in train]
        planned = {info.train_samples[i][0] for i in train.indices()}
        assert len(sizes) == 2 and sum(sizes) == 64 - (broken in planned)  # the broken file is a hole
        assert sum(len(y) for _, y in val) == 40
    bad = info.bad_files
    assert bad.left_out == {broken} and bad.recoveries == 1
    assert {p for p, (how, _) in bad.entries.items() if how == REPAIRED} == set(odd)


def test_torch_worker_processes_report_a_file_deleted_mid_run(tmp_path):
    paths = _files(tmp_path, 10)
    bad = BadFiles(True, announce=False)
    val = _torch(paths, False, bad, workers=1)
    assert len([i for b in _epoch(val) for i in b]) == 10
    os.remove(paths[6])  # the persistent worker finds it gone next epoch
    assert sorted(i for b in _epoch(val) for i in b) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert bad.left_out == {paths[6]} and "No such file" in bad.entries[paths[6]][1]


def test_torch_image_over_pillows_pixel_limit_is_a_bad_file(tmp_path, monkeypatch, capsys):
    """Pillow refuses an image over twice Image.MAX_IMAGE_PIXELS (DecompressionBombError, not an
    OSError): the torch loader leaves it out with one line naming the limit, as any file it
    cannot decode; the resident-or-streaming probe passes over it."""
    from PIL import Image

    from automix_fast.data.torch_loader import _probe_small
    from automix_fast.data.transforms import load_rgb
    from datakit import make_folder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # refused above 800 pixels; the others have 256
    root = tmp_path / "data"
    make_folder(root, per_class=4, size=(16, 16))
    big, big_val = str(root / "train" / "cat" / "big.jpg"), str(root / "val" / "dog" / "big.jpg")
    for path in (big, big_val):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    with pytest.raises(DataError) as e:
        load_rgb(big)
    assert str(e.value) == (f"cannot decode image {big}: too large: 1200 pixels, over the 800 pixels Pillow decodes "
                            "(twice PIL.Image.MAX_IMAGE_PIXELS)")
    assert _probe_small([(big, 0)]) is False
    from automix_fast.data.folder import image_problem

    write(str(tmp_path / "big_crlf.jpg"), open(big, "rb").read() + b"\r\n")
    assert image_problem(str(tmp_path / "big_crlf.jpg")) is None  # too large is not truncated
    train, val, info = build_loaders(_spec(dataset="folder", data_dir=str(root), loader="torch"))
    train_batches = [y for _, y in train]
    assert sum(len(y) for y in train_batches) >= 7 and sum(len(y) for _, y in val) == 8
    assert info.bad_files.left_out == {big, big_val}
    err = capsys.readouterr().err
    assert err.count(big) == err.count(big_val) == 1 and err.count("over the 800 pixels Pillow decodes") == 2
    assert "Traceback" not in err


@needs_dali
def test_dali_eval_loader_screens_jpeg_headers_as_training_does(tmp_path):
    """eval and visualize build the DALI val loader alone (evalset.build_eval_loader): a JPEG
    whose header DALI's parser rejects is read from a repaired copy and never reaches a
    pipeline (no pipeline failure to recover from), and every image is evaluated."""
    from automix_fast.data.evalset import build_eval_loader, resolve_eval_data

    paths = _files(tmp_path / "val" / "a", 5) + _files(tmp_path / "val" / "b", 5, seed=10)
    odd = paths[7]
    write(odd, ODD_EDITS[next(iter(ODD_EDITS))](open(odd, "rb").read()))
    info = resolve_eval_data(str(tmp_path))
    loader = build_eval_loader(_spec(dataset="folder", data_dir=str(tmp_path), loader="dali"), info)
    assert sorted(y for _, ys in loader for y in ys.tolist()) == [0] * 5 + [1] * 5
    assert loader.bad_files.entries[odd][0] == REPAIRED and loader.bad_files.recoveries == 0


def test_a_full_temp_folder_for_the_copies_dali_reads_is_one_line(tmp_path, monkeypatch):
    """The repaired copy of an odd JPEG header and Pillow's copy of a file DALI cannot decode go
    to a temp folder: when it is full, one line naming the file and TMPDIR, no half-written copy."""
    import errno
    import io

    from automix_fast import atomic
    from automix_fast.errors import OutputError

    odd = write(str(tmp_path / "data" / "odd.jpg"), ODD_EDITS["ff00_header"](jpeg_bytes(picture(16, 16, 0))))
    plain = write(str(tmp_path / "data" / "plain.png"), png_bytes(picture(16, 16, 1)))

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "open", lambda path, mode="r", *a, **k: Full(path, "w"), raising=False)
    bad = BadFiles(True, announce=False)
    for path, record in ((odd, lambda: bad.record_header(odd, "FF 00 in the header")),
                         (plain, lambda: bad.record(plain, "DALI fn.decoders.image: unsupported", try_pillow=True))):
        with pytest.raises(OutputError) as info:
            record()
        message = str(info.value)
        assert path in message and "No space left on device" in message and "TMPDIR" in message, message
        assert "\n" not in message, message
    assert not bad.has_copies and not [f for _, _, files in os.walk(bad._copy_dir) for f in files]
