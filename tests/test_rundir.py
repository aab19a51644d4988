"""The run folder through the real command: the printed resume command works alone, a flag that
may not change on resume is one line naming it, runs never mix, default names never collide,
config.yaml shows what ran, and a write that fails (unwritable folder, full disk) is one line
with the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
import yaml

from automix_fast import rundir
from automix_fast.cli import main
from automix_fast.config import build_config
from automix_fast.engine import checkpoint as ck
from faultkit import cli, make_folder, popen, records, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 60 train images: 15 steps of 4 per epoch, so a signal after the first step lands mid-epoch.
    return make_folder(tmp_path_factory.mktemp("runfolder") / "data", train_per_class=20)


def one_error(run) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, lines
    return lines[0]


def as_python(command: str) -> list[str]:
    """The printed `automix-fast train ...` as argv for `python -m automix_fast` (what faultkit.cli runs)."""
    argv = shlex.split(command)
    assert argv[:2] == ["automix-fast", "train"], command
    return argv[1:]


def test_sigterm_prints_a_short_command_that_resumes_alone(data, tmp_path):
    # Non-default settings that the short command must not need again.
    proc = popen(train_args(data, tmp_path, "short", "--mix", "mixup", "--lr", "0.03", "--seed", "3", batch=4))
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "epoch 1/2 [" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(seen) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM, after the checkpoint is written
    command = next(line.split("continue with: ", 1)[1] for line in out.splitlines() if "continue with: " in line)
    assert command == f"automix-fast train --resume auto --output {tmp_path} --experiment short"
    resumed = cli(as_python(command))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "done: mixup tinynet, 2 epochs" in resumed.stdout
    saved = yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())
    assert (saved["lr"], saved["seed"], saved["mix"], saved["batch_size"]) == (0.03, 3, "mixup", 4)
    steps = [r["step"] for r in records(tmp_path / "short")]
    assert steps == sorted(set(steps)) and len(steps) == 30  # every step logged once: no mixed records


def test_resume_extends_epochs_and_refuses_other_changes(data, tmp_path):
    first = cli(train_args(data, tmp_path, "ext", "--mix", "cutmix", epochs=1))
    assert first.returncode == 0, first.stderr
    assert "1 epoch x 7 steps" in first.stdout and "amp off" in first.stdout  # item 9: no 'amp None', no '1 epochs'
    # config.yaml keeps what was asked, each null/auto marked with what it ran as; the checkpoint
    # keeps what was asked too, so a resume on another machine resolves again.
    text = (tmp_path / "ext" / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["amp"] is None and saved["channels_last"] is None and saved["mix_alpha"] is None
    assert saved["dataset"] == "auto" and saved["validation_batch_size"] is None and saved["num_classes"] is None
    assert "amp: null  # ran as false" in text and "dataset: auto  # ran as folder" in text
    assert "mix_alpha: null  # ran as 0.2" in text and "validation_batch_size: null  # ran as 16" in text
    assert ck.load_checkpoint(tmp_path / "ext" / "last.pt")["config"]["amp"] is None
    msg = one_error(cli(["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "ext",
                         "--lr", "0.2", "--smoothing", "0.1", "--epochs", "2"]))
    assert "--lr (0.05 -> 0.2)" in msg and "--smoothing (0.0 -> 0.1)" in msg and "--epochs" in msg.split("only", 1)[1]
    extended = cli(["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "ext", "--epochs", "2",
                    "--log-interval", "4", "--workers", "0"])
    assert extended.returncode == 0, extended.stderr
    assert "epoch 2/2" in extended.stdout and "done: cutmix tinynet, 2 epochs" in extended.stdout
    assert ck.load_checkpoint(tmp_path / "ext" / "last.pt")["next_epoch"] == 2
    # --resume PATH: the same, from that checkpoint, writing beside it.
    again = cli(["train", "--resume", str(tmp_path / "ext" / "checkpoint-0002.pt"), "--epochs", "3", "--log-interval", "8"])
    assert again.returncode == 0, again.stderr
    assert f"run folder: {tmp_path / 'ext'}" in again.stdout and "epoch 3/3" in again.stdout
    # A full disk while logging metrics: one line, the last checkpoint intact.
    if os.path.exists("/dev/full"):
        (tmp_path / "ext" / "metrics.jsonl").unlink()
        (tmp_path / "ext" / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
        msg = one_error(cli(["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "ext", "--epochs", "4"]))
        assert "metrics" in msg and "No space left on device" in msg and "end of epoch 3" in msg
        assert ck.load_checkpoint(tmp_path / "ext" / "last.pt")["next_epoch"] == 3


def test_a_new_run_never_writes_into_a_used_folder(data, tmp_path, capsys):
    args = train_args(data, tmp_path, "used", "--mix", "vanilla", epochs=1)
    assert cli(args).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "used").iterdir()}
    msg = one_error(cli(args))
    assert f"run folder {tmp_path / 'used'} already holds a run" in msg
    assert "--resume auto --experiment used" in msg and "another --experiment" in msg
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "used").iterdir()} == before
    # --resume auto with no checkpoint in a folder holding files: refused too, not mixed in.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text("{}\n")
    assert main(train_args(data, tmp_path, "junk", "--resume", "auto", epochs=1)) == 2
    assert "holds files (metrics.jsonl) but no checkpoint" in capsys.readouterr().err


def test_default_names_taken_get_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    cfg = build_config(overrides=dict(output=str(tmp_path), model="tinynet", mix="automix"))
    first = rundir.claim(rundir.locate(cfg), named=False)
    second = rundir.claim(rundir.locate(cfg), named=False)  # started in the same second
    assert (first.name, second.name) == ("20260101-000000-tinynet-automix", "20260101-000000-tinynet-automix-2")
    assert rundir.claim(tmp_path / "empty", named=True) == tmp_path / "empty"
    assert rundir.claim(tmp_path / "empty", named=True) == tmp_path / "empty"  # an empty folder mixes nothing


def test_unwritable_output_is_one_line(data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(train_args(data, blocker / "runs", "x", "--mix", "vanilla", epochs=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create run folder" in err[0] and f"{blocker} is not a folder" in err[0], err
    assert main(train_args(data, blocker, "x", "--mix", "vanilla", epochs=1)) == 2  # --output names the file itself
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{blocker} is not a folder" in err[0], err
    # A folder without write permission (simulated: tests may run as root, who may write anywhere).
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    assert main(train_args(data, tmp_path / "ro", "x", "--mix", "vanilla", epochs=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'ro'} is not writable" in err[0], err


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(data, tmp_path, monkeypatch, capsys):
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 1:  # epoch 1's last.pt went through; epoch 2's does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", fsync)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(train_args(data, tmp_path, "ckfull", "--mix", "vanilla", epochs=2))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot write checkpoint" in err[0] and "No space left on device" in err[0] and "end of epoch 1" in err[0]
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path / "ckfull" / "last.pt")["next_epoch"] == 1
    assert not [p for p in (tmp_path / "ckfull").iterdir() if p.name.startswith(".")]  # no temp files left


def test_resume_drops_metrics_logged_after_its_checkpoint(tmp_path):
    """A run killed after its last checkpoint logged steps the resumed run logs again: they go."""
    lines = [json.dumps({"type": "train", "step": s, "values": {}}) for s in range(1, 11)]
    lines.insert(5, json.dumps({"type": "eval", "step": 5, "values": {}}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "train", "st')  # cut by the kill
    assert rundir.trim_metrics(tmp_path, 5) == 6
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in kept] == [("train", s) for s in range(1, 6)] + [("eval", 5)]
