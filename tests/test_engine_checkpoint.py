import argparse
import os
import random

import numpy as np
import pytest
import torch

from automix_fast.engine import checkpoint as ck
from automix_fast.errors import CheckpointError, UserError


def _state(v=1.0):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 7, "value": v,
            "config": {"lr": 0.1, "name": "x", "sizes": [1, 2]}, "rng": ck.rng_state()}


def test_round_trip(tmp_path):
    s = _state()
    ck.save_checkpoint(tmp_path / "a.pt", s)
    out = ck.load_checkpoint(tmp_path / "a.pt")
    assert out["step"] == 7 and out["config"] == s["config"]
    for k, v in s["model"].items():
        assert torch.equal(out["model"][k], v)
    assert out["optimizer"]["param_groups"] == s["optimizer"]["param_groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp files left


def test_unloadable_state_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['args'\].*Namespace"):
        ck.save_checkpoint(tmp_path / "a.pt", {"args": argparse.Namespace(lr=1)})
    with pytest.raises(TypeError, match=r"state\['m'\]\['acc'\].*numpy"):
        ck.save_checkpoint(tmp_path / "a.pt", {"m": {"acc": np.float64(1.0)}})
    assert not list(tmp_path.iterdir())


def test_crash_during_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"value": 1.0})

    def boom(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(path, {"value": 2.0})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["value"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"value": 1.0})
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"value": 2.0})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["value"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_flipped_foreign_missing(tmp_path):
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, _state())
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated"):
        ck.load_checkpoint(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        ck.load_checkpoint(path)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{path}.*checksum mismatch"):
        ck.load_checkpoint(path)

    torch.save({"a": 1}, path)  # a plain torch file is not ours
    with pytest.raises(CheckpointError, match="not an automix-fast checkpoint"):
        ck.load_checkpoint(path)

    with pytest.raises(CheckpointError, match="not found") as e:
        ck.load_checkpoint(tmp_path / "nope.pt")
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_manager_keeps_recent_and_best(tmp_path):
    mgr = ck.CheckpointManager(tmp_path, keep_recent=2)
    metrics = [0.5, 0.7, 0.6, 0.9, 0.8]
    for epoch, m in enumerate(metrics):
        mgr.save({"value": float(epoch)}, epoch, metric=m)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "checkpoint-0003.pt", "checkpoint-0004.pt", "last.pt"]
    assert not (tmp_path / "last.pt").is_symlink()
    best = ck.load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 3 and best["best_metric"] == 0.9 and best["best_epoch"] == 3
    last = ck.load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 4 and last["best_metric"] == 0.9

    # Resume: a fresh manager restored from last.pt does not overwrite best.pt with a worse metric.
    mgr2 = ck.CheckpointManager(tmp_path, keep_recent=2)
    mgr2.restore(last)
    assert not mgr2.save({"value": 5.0}, 5, metric=0.85)
    assert ck.load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert mgr2.save({"value": 6.0}, 6, metric=0.95)
    assert ck.load_checkpoint(tmp_path / "best.pt")["epoch"] == 6

    # A mid-epoch last.pt still carries the best metric, so a resume from it keeps following it.
    mgr2.save_last({"value": 6.5})
    mgr3 = ck.CheckpointManager(tmp_path, keep_recent=2)
    mgr3.restore(ck.load_checkpoint(tmp_path / "last.pt"))
    assert (mgr3.best_metric, mgr3.best_epoch) == (0.95, 6)
    assert sorted(p.name for p in tmp_path.iterdir())[1:3] == ["checkpoint-0005.pt", "checkpoint-0006.pt"]


def test_resuming_an_earlier_epoch_sets_the_later_ones_aside_and_pruning_keeps_what_it_wrote(tmp_path):
    """A run continued from epoch 1 of its own folder: the later continuation's files are renamed
    (not deleted) out of reach of --resume auto and pruning; the new epoch's file is kept even
    with a higher-numbered one beside it."""
    mgr = ck.CheckpointManager(tmp_path, keep_recent=3)
    for epoch in (1, 2, 3):
        mgr.save({"value": float(epoch)}, epoch)
    (tmp_path / "checkpoint-0003.superseded.pt").write_bytes(b"from an earlier set-aside")
    moved = ck.set_aside_after(tmp_path, 1, resumed_from=tmp_path / "checkpoint-0001.pt")
    assert [(a.name, b.name) for a, b in moved] == [
        ("last.pt", "last.superseded.pt"), ("checkpoint-0003.pt", "checkpoint-0003.superseded-2.pt"),
        ("checkpoint-0002.pt", "checkpoint-0002.superseded.pt")]
    assert ck.load_checkpoint(tmp_path / "checkpoint-0003.superseded-2.pt")["value"] == 3.0
    assert (tmp_path / "checkpoint-0003.superseded.pt").read_bytes() == b"from an earlier set-aside"
    assert ck.latest_valid(tmp_path)[0].name == "checkpoint-0001.pt"
    resumed = ck.CheckpointManager(tmp_path, keep_recent=1)
    resumed.save({"value": 2.5}, 2)
    assert ck.load_checkpoint(tmp_path / "checkpoint-0002.pt")["value"] == 2.5
    assert not (tmp_path / "checkpoint-0001.pt").exists()
    # Resumed from last.pt (or the same file under another name): nothing is set aside.
    assert ck.set_aside_after(tmp_path, 2, resumed_from=tmp_path / "checkpoint-0002.pt") == []
    # An epoch file above the one written (copied in by hand) is neither counted nor deleted.
    (tmp_path / "checkpoint-0009.pt").write_bytes((tmp_path / "last.pt").read_bytes())
    resumed.save({"value": 3.5}, 3)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-000?.pt")) == ["checkpoint-0003.pt", "checkpoint-0009.pt"]


def test_manager_lower_is_better(tmp_path):
    mgr = ck.CheckpointManager(tmp_path)
    assert mgr.save({}, 0, metric=torch.tensor(2.0), higher_is_better=False)
    assert not mgr.save({}, 1, metric=3.0, higher_is_better=False)
    assert mgr.save({}, 2, metric=1.0, higher_is_better=False)
    assert not mgr.save({}, 3)  # no metric: no best.pt update
    assert ck.load_checkpoint(tmp_path / "best.pt")["epoch"] == 2


def test_latest_valid_falls_back(tmp_path, capsys):
    mgr = ck.CheckpointManager(tmp_path, keep_recent=3)
    for epoch in range(3):
        mgr.save({"value": float(epoch)}, epoch)
    # last.pt and checkpoint-0002.pt are one file under two names: damage each name on its own
    # (unlink first), as two separate failures would.
    data = (tmp_path / "checkpoint-0002.pt").read_bytes()
    for name, blob in (("last.pt", b"garbage"), ("checkpoint-0002.pt", data[:-10])):
        (tmp_path / name).unlink()
        (tmp_path / name).write_bytes(blob)
    path, state = ck.latest_valid(tmp_path)
    assert path.name == "checkpoint-0001.pt" and state["epoch"] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert f"checkpoint {tmp_path / 'last.pt'} is corrupt (" in err[0]
    assert err[0].endswith(f"falling back to {tmp_path / 'checkpoint-0002.pt'}")
    assert "truncated" in err[1] and err[1].endswith("checkpoint-0001.pt")


def test_resolve_resume(tmp_path, capsys):
    assert ck.resolve_resume(None, tmp_path) is None
    assert ck.resolve_resume("auto", tmp_path / "empty") is None
    assert "starting fresh" in capsys.readouterr().err
    ck.CheckpointManager(tmp_path).save({"value": 1.0}, 0)
    path, state = ck.resolve_resume("auto", tmp_path)
    assert path.name == "last.pt" and state["epoch"] == 0
    path, state = ck.resolve_resume(str(tmp_path / "checkpoint-0000.pt"), tmp_path)
    assert state["value"] == 1.0
    path, state = ck.resolve_resume(str(tmp_path), tmp_path / "elsewhere")  # a run folder: its newest
    assert path == tmp_path / "last.pt" and state["epoch"] == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no valid checkpoint"):
        ck.resolve_resume(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt"):
        ck.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist())


def test_rng_state_round_trip(tmp_path):
    random.gauss(0, 1)  # leave a cached gaussian in both generators
    np.random.randn()
    ck.save_checkpoint(tmp_path / "r.pt", {"rng": ck.rng_state()})
    first = _draws()
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert _draws() == first


def test_epoch_last_and_best_are_one_file_on_disk(tmp_path):
    """An epoch's state is written once; its other names are hard links, and old epochs go."""
    mgr = ck.CheckpointManager(tmp_path, keep_recent=2)
    for epoch, metric in ((1, 50.0), (2, 40.0), (3, 45.0)):
        mgr.save({"value": float(epoch)}, epoch, metric=metric)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "checkpoint-0002.pt", "checkpoint-0003.pt", "last.pt"]
    inode = {n: (tmp_path / n).stat().st_ino for n in names}
    assert inode["last.pt"] == inode["checkpoint-0003.pt"]
    assert inode["best.pt"] not in (inode["checkpoint-0002.pt"], inode["checkpoint-0003.pt"])  # epoch 1, deleted name
    assert len(set(inode.values())) == 3  # three states on disk, not five copies
    assert ck.load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    mgr.save({"value": 4.0}, 4, metric=60.0)
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino


def test_no_hard_links_falls_back_to_copies(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ck.os, "link", no_links)
    ck.CheckpointManager(tmp_path, keep_recent=1).save({"value": 1.0}, 1, metric=1.0)
    assert ck.load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert ck.load_checkpoint(tmp_path / "checkpoint-0001.pt")["epoch"] == 1
    assert (tmp_path / "best.pt").stat().st_ino != (tmp_path / "last.pt").stat().st_ino


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_failed_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    import errno

    from automix_fast.errors import OutputError

    mgr = ck.CheckpointManager(tmp_path, keep_recent=3)
    mgr.save({"value": 1.0}, 1, metric=1.0)

    def full(fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OutputError) as info:
        mgr.save({"value": 2.0}, 2, metric=2.0)
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "last.pt") in msg and os.strerror(getattr(errno, code)) in msg
    assert ck.load_checkpoint(tmp_path / "last.pt")["value"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint-0001.pt", "last.pt"]  # no temp files


def test_check_training_state(tmp_path):
    good = {"format": ck.FORMAT, "config": {"model": "tinynet"}, "mixer": {}}
    ck.check_training_state("a.pt", good, with_config=True)
    ck.check_training_state("a.pt", {**good, "config": None})  # --initial-checkpoint needs no config
    with pytest.raises(CheckpointError, match=r"^a\.pt is not an automix-fast training checkpoint$"):
        ck.check_training_state("a.pt", {**good, "config": None}, with_config=True)
    with pytest.raises(CheckpointError, match=r"^--initial-checkpoint a\.pt is not an automix-fast training checkpoint$"):
        ck.check_training_state("a.pt", {**good, "format": "other/1"}, "--initial-checkpoint")
    with pytest.raises(CheckpointError, match="not an automix-fast training checkpoint"):
        ck.check_training_state("a.pt", {**good, "mixer": [1]})
