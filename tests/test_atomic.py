"""automix_fast.atomic: the one writer of run files, checkpoints, summary.csv and bad_images.txt."""
import errno
import os

import pytest

from automix_fast import atomic
from automix_fast.engine.summary_csv import write_summary_csv
from automix_fast.errors import OutputError


def test_interrupted_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = atomic.write_text(tmp_path / "summary.json", "old\n")
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic.write_json(path, {"new": 1})
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    class Full:
        def __init__(self, path, mode):
            open(path, mode).close()  # the temp file exists, as on a real full disk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "open", Full, raising=False)
    history = [{"epoch": 1, "train": {"loss": 1.0, "lr": 0.1}, "eval": {"one_top1": 50.0}}]
    with pytest.raises(OutputError) as info:
        write_summary_csv(tmp_path / "summary.csv", history, ["one"])
    assert str(info.value) == f"cannot write {tmp_path / 'summary.csv'}: No space left on device (disk full)"
    assert list(tmp_path.iterdir()) == []


def test_durable_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic.write_bytes(tmp_path / "a.bin", b"x", durable=True)
    assert len(synced) == 2  # the temp file, then the folder after the rename
    synced.clear()
    atomic.write_bytes(tmp_path / "b.bin", b"y")
    assert synced == []
    assert (tmp_path / "a.bin").read_bytes() == b"x" and (tmp_path / "b.bin").read_bytes() == b"y"


def test_stale_temp_files_of_gone_processes_are_removed_and_nothing_else(tmp_path):
    """A temp file whose writer was killed (a real child process, and a PID above Linux's
    largest) is removed; one of a running process (this one, a live child), a folder named like
    one and files that only resemble the pattern stay."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    stale = [f".last.pt.{gone.pid}.tmp", ".summary.json.4194305.tmp", f".checkpoint-0002.pt.{2 ** 64}.tmp"]
    kept = [f".last.pt.{os.getpid()}.tmp", f".last.pt.{live.pid}.tmp", ".last.pt.tmp", f"last.pt.{gone.pid}.tmp",
            f".last.pt.{gone.pid}.tmp.part", ".last.pt.0.tmp", ".last.pt.x1.tmp", "last.pt"]
    try:
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f".tensorboard.{gone.pid}.tmp").mkdir()
        removed = atomic.remove_stale_temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [f".tensorboard.{gone.pid}.tmp"])
    assert atomic.temp_path(tmp_path / "last.pt").name == f".last.pt.{os.getpid()}.tmp"
