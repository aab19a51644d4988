"""File names that are not valid UTF-8 (Latin-1 names copied from old cameras and Windows shares):
Python holds them with surrogate escapes; the loaders pass their own bytes to DALI and its
decoding process, and bad_images.txt keeps them byte for byte. Skipped where the file system
refuses such names.
"""
from __future__ import annotations

import os

import pytest

from automix_fast.data import DataSpec
from automix_fast.data import dali as dali_mod
from automix_fast.data.bad_files import BAD_FILES_NAME, PILLOW, REPAIRED, SKIPPED, BadFiles
from faultkit import cli, make_folder, train_args
from oddkit import ODD_EDITS, UNREADABLE_EDITS, jpeg_bytes, picture, write

needs_dali = pytest.mark.skipif(not dali_mod.dali_available(), reason="NVIDIA DALI is not installed")
LATIN1 = b"caf\xe9"  # "café" in Latin-1: not UTF-8


def non_utf8(folder, stem: bytes, ext: str = ".jpg") -> str:
    """The path (str, surrogate-escaped) of a new file named `stem` + ext in `folder`; skips the
    test where the file system refuses the name."""
    os.makedirs(folder, exist_ok=True)
    raw = os.path.join(os.fsencode(str(folder)), stem + ext.encode())
    try:
        open(raw, "wb").close()
    except OSError as e:
        pytest.skip(f"the file system refuses a name that is not UTF-8: {e}")
    path = os.fsdecode(raw)
    with pytest.raises(UnicodeEncodeError):
        path.encode("utf-8")
    return path


def test_torch_run_with_skip_writes_the_list_and_the_checkpoint(tmp_path):
    """A bad file with such a name, dropped before training by --skip-bad-images: listed in
    bad_images.txt under its own bytes, the epoch's checkpoint written, and the list read back by
    the next run in the folder."""
    data = make_folder(tmp_path / "data", train_per_class=6, val_per_class=2)
    bad = non_utf8(data / "train" / "class0", LATIN1, ".png")
    write(bad, b"not an image")
    run = cli(train_args(data, tmp_path, "r", "--mix", "vanilla", "--skip-bad-images", epochs=1),
              encoding="utf-8", errors="backslashreplace")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and (tmp_path / "r" / "last.pt").is_file()
    listed = (tmp_path / "r" / BAD_FILES_NAME).read_bytes()
    assert listed.startswith(os.fsencode(bad) + b"\t" + SKIPPED.encode() + b"\t")
    again = BadFiles(True)
    again.add_screened([(bad, "not a JPEG, PNG, BMP or WEBP file")])
    again.start_run(tmp_path / "r")
    assert bad in again._listed


@needs_dali
@pytest.mark.parametrize("isolated", [True, False])
def test_dali_reads_such_names_and_their_copies(tmp_path, isolated):
    """Both in the decoding process and in this one: a plain file, one read from a repaired copy
    and one from a Pillow copy, all with such names, are in the epoch."""
    base = jpeg_bytes(picture(18, 20, 0))
    plain = write(non_utf8(tmp_path, LATIN1), base)
    odd = write(non_utf8(tmp_path, LATIN1 + b"-odd"), ODD_EDITS[next(iter(ODD_EDITS))](base))
    pillow = write(non_utf8(tmp_path, LATIN1 + b"-pillow"), base)
    paths = [plain, odd, pillow] + [write(str(tmp_path / f"{i}.jpg"), jpeg_bytes(picture(18, 20, i))) for i in range(5)]
    assert len(dali_mod.decode_images([plain])) == 1
    bad = BadFiles(True, announce=False)
    dali_mod.screen_jpeg_headers(paths, bad)
    assert bad.record(pillow, "stand-in DALI failure", try_pillow=True) == PILLOW
    assert bad.entries[odd][0] == REPAIRED
    old, dali_mod.ISOLATE_CPU = dali_mod.ISOLATE_CPU, isolated
    try:
        spec = DataSpec(img_size=16, batch_size=4, eval_batch_size=4, workers=1, seed=3, skip_bad_images=True)
        loader = dali_mod.DaliFolderLoader([(p, i) for i, p in enumerate(paths)], spec, False, "cifar", bad)
    finally:
        dali_mod.ISOLATE_CPU = old
    assert sorted(i for _, y in loader for i in y.tolist()) == list(range(len(paths)))
    assert not bad.left_out


@needs_dali
def test_dali_file_left_out_with_such_a_name(tmp_path):
    """A file no decoder reads, with such a name, is left out and named once (stderr escapes it)."""
    paths = [write(str(tmp_path / f"{i}.jpg"), jpeg_bytes(picture(18, 20, i))) for i in range(6)]
    broken = write(non_utf8(tmp_path, LATIN1), UNREADABLE_EDITS["undefined_huffman"](jpeg_bytes(picture(18, 20, 9))))
    spec = DataSpec(img_size=16, batch_size=4, eval_batch_size=4, workers=1, seed=3, skip_bad_images=True)
    bad = BadFiles(True, announce=False)
    loader = dali_mod.DaliFolderLoader([(p, i) for i, p in enumerate(paths + [broken])], spec, False, "cifar", bad)
    assert sorted(i for _, y in loader for i in y.tolist()) == list(range(6))
    assert bad.left_out == {broken}


@needs_dali
def test_the_decoding_process_is_quiet_when_its_loader_is_gone(capfd):
    """The loader goes away before the decoding process has said it is ready (its pipes closed,
    as when the loader's process ends): the decoding process exits with status 0, no traceback."""
    from automix_fast.data.dali_child import DecodingProcess

    child = DecodingProcess({}, 1, [], [])
    child._recv_conn.close()
    child._send_conn.close()
    assert child.proc.wait(timeout=120) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
