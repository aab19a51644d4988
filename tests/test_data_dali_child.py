"""DALI's CPU-only pipelines run in a decoding process (automix_fast/data/dali_child.py): the same
batches as in this process, and a native crash or a kill there does not end the run. The
crashes are made by the test hook AUTOMIX_FAST_DALI_CRASH (the child kills itself), since no
real file makes DALI crash reproducibly.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from automix_fast.data import DataSpec
from automix_fast.data import dali as dali_mod
from automix_fast.data.bad_files import LEFT_OUT, PILLOW, BadFiles
from automix_fast.data.dali_child import CRASH_ENV
from automix_fast.errors import DataError
from oddkit import UNREADABLE_EDITS, jpeg_bytes, picture, write

pytestmark = pytest.mark.skipif(not dali_mod.dali_available(), reason="NVIDIA DALI is not installed")


def _files(folder, n: int) -> list[str]:
    return [write(os.path.join(str(folder), f"{i:03d}.jpg"), jpeg_bytes(picture(18, 20 + i % 3, i))) for i in range(n)]


def _loader(paths, train: bool, isolated: bool, bad=None, aug: str = "cifar"):
    """Labels are file indices, so a batch says which files it holds."""
    spec = DataSpec(img_size=16, batch_size=4, eval_batch_size=4, workers=1, seed=3, skip_bad_images=True)
    old, dali_mod.ISOLATE_CPU = dali_mod.ISOLATE_CPU, isolated
    try:
        loader = dali_mod.DaliFolderLoader([(p, i) for i, p in enumerate(paths)], spec, train, aug,
                                           bad if bad is not None else BadFiles(True, announce=False))
    finally:
        dali_mod.ISOLATE_CPU = old
    assert (loader._child is not None) == isolated
    return loader


def _epoch(loader, epoch: int = 0, images: bool = False):
    loader.set_epoch(epoch)
    return [(x.clone(), y.tolist()) if images else y.tolist() for x, y in loader]


@pytest.mark.parametrize("train, aug", [(True, "cifar"), (True, "imagenet"), (False, "imagenet")])
def test_decoding_process_yields_the_in_process_batches(tmp_path, train, aug):
    paths = _files(tmp_path, 13)
    here, there = _loader(paths, train, False, aug=aug), _loader(paths, train, True, aug=aug)
    for epoch in range(2):
        a, b = _epoch(here, epoch, images=True), _epoch(there, epoch, images=True)
        assert len(a) == len(b) == len(here)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert ya == yb and torch.equal(xa, xb)


def test_a_killed_decoding_process_is_restarted_and_nothing_moves(tmp_path, monkeypatch):
    paths = _files(tmp_path / "img", 22)  # 5 training batches of 4
    clean = [_epoch(_loader(paths, True, False), e) for e in range(2)]
    marker = tmp_path / "killed"
    monkeypatch.setenv(CRASH_ENV, f"batch:3:{marker}")  # SIGKILL once, when batch 4 of 5 is decoded
    bad = BadFiles(True, announce=False)
    loader = _loader(paths, True, True, bad)
    got = [_epoch(loader, e) for e in range(2)]
    assert marker.exists()  # the process was killed
    assert got == clean  # every sample once per epoch, in the same batches: none skipped, none repeated
    assert bad.entries == {} and bad.recoveries == 1  # an outside kill: no innocent file blamed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_to_the_process_group_leave_the_decoding_process_alone(tmp_path, signum):
    """Ctrl-C signals the terminal's whole process group (a scheduler's SIGTERM every process of
    the job): the training process stops at a step boundary, so the decoder must neither die with a
    KeyboardInterrupt traceback nor need a restart; it serves on, the same batches."""
    paths = _files(tmp_path, 12)
    clean = _epoch(_loader(paths, True, False))
    bad = BadFiles(True, announce=False)
    loader = _loader(paths, True, True, bad)
    assert _epoch(loader) == clean  # started and serving (its handlers are set before "ready")
    os.kill(loader._child.proc.pid, signum)
    assert loader._child.proc.poll() is None and _epoch(loader) == clean
    assert bad.recoveries == 0 and loader._child.proc.poll() is None


def test_a_process_that_keeps_dying_stops_with_one_line(tmp_path, monkeypatch):
    paths = _files(tmp_path, 12)
    monkeypatch.setenv(CRASH_ENV, "batch:1")  # killed each time it reaches batch 2
    monkeypatch.setattr(dali_mod, "MAX_RESTARTS", 1)
    bad = BadFiles(True, announce=False)
    loader = _loader(paths, False, True, bad)
    with pytest.raises(DataError, match="killed by SIGKILL 2 times in epoch 1") as e:
        _epoch(loader)
    assert "\n" not in str(e.value) and bad.entries == {}
    with pytest.raises(DataError, match="2 times in epoch 1"):  # the loader is still usable: the same again, no hang
        _epoch(loader)


@pytest.mark.parametrize("readable", [True, False])
def test_a_file_the_decoder_crashes_on_is_found_and_handled_once(tmp_path, monkeypatch, readable):
    paths = _files(tmp_path, 13)
    clean = _loader(paths, False, False)
    batches = _epoch(clean)
    target = batches[1][2]
    if not readable:  # Pillow cannot read it either: left out
        write(paths[target], UNREADABLE_EDITS["undefined_huffman"](open(paths[target], "rb").read()))
    monkeypatch.setenv(CRASH_ENV, f"file:{os.path.basename(paths[target])}")  # SIGSEGV whenever DALI reads it
    bad = BadFiles(True, announce=False)
    val = _loader(paths, False, True, bad)
    expected = batches if readable else [[i for i in b if i != target] for b in batches]
    for epoch in range(2):  # the second epoch plans around it (or reads its Pillow copy): no crash
        assert _epoch(val, epoch) == expected
    how, reason = bad.entries[paths[target]]
    assert list(bad.entries) == [paths[target]] and how == (PILLOW if readable else LEFT_OUT)
    assert "DALI crashed: its decoding process was killed by SIGSEGV" in reason
    assert bad.recoveries == 1


# ----------------------------------------------------------------------------- whole runs (CLI)

def _folder(root):
    from oddkit import odd_folder

    return odd_folder(str(root), per_class=10, size=16, every=1000)  # clean: 20 train, 10 val JPEGs


@pytest.mark.slow
def test_cli_run_survives_a_killed_decoding_process(tmp_path):
    from faultkit import cli, records, train_args

    _folder(tmp_path / "data")
    marker = tmp_path / "killed"
    run = cli(train_args(tmp_path / "data", tmp_path, "r", "--loader", "dali", "--workers", "1", batch=4),
              env={CRASH_ENV: f"batch:2:{marker}"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert marker.exists() and "Traceback" not in run.stderr
    listed = tmp_path / "r" / "bad_images.txt"
    assert not listed.exists() or listed.read_text() == ""  # nothing blamed
    assert [r["values"]["pipeline_recoveries"] for r in records(tmp_path / "r", "data")] == [1]
    steps = records(tmp_path / "r", "train")
    assert len(steps) == 2 * (20 // 4)  # every step of both epochs ran
    assert [r["values"]["count"] for r in records(tmp_path / "r", "eval")] == [10, 10]  # every val image


@pytest.mark.slow
def test_cli_file_that_crashes_the_decoder_is_listed_once(tmp_path):
    from faultkit import cli, records, train_args

    _folder(tmp_path / "data")
    broken = os.path.join(str(tmp_path / "data"), "train", "b", "003.jpg")
    write(broken, UNREADABLE_EDITS["undefined_huffman"](open(broken, "rb").read()))
    args = train_args(tmp_path / "data", tmp_path, "r", "--loader", "dali", "--workers", "1", "--skip-bad-images", batch=4)
    run = cli(args, env={CRASH_ENV: "file:003.jpg"})  # train/b/003.jpg and the other 003.jpg files crash it
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    listed = [line.split("\t") for line in (tmp_path / "r" / "bad_images.txt").read_text().splitlines()]
    assert len({p for p, _, _ in listed}) == len(listed)  # nobody twice
    entries = {p: (how, why) for p, how, why in listed}
    assert entries[broken][0] == LEFT_OUT and "DALI crashed" in entries[broken][1]
    assert all(how == PILLOW for p, (how, _) in entries.items() if p != broken)  # readable: Pillow copies
    for path in entries:
        assert run.stderr.count(path) == 1, path  # named once
    assert records(tmp_path / "r", "eval")[-1]["values"]["count"] == 10  # the val 003.jpg files read from their copies
