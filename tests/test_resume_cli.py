"""Resuming through the real command: what `--resume` accepts and refuses, a start that failed
before its first step does not block its rerun, the exit status of an interrupted run, what a
resumed epoch says it ran, a finished run left alone, and a fork under another --experiment."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

from automix_fast.cli import main
from automix_fast.engine import metrics
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.errors import ConfigError
from faultkit import (assert_states_equal, cli, make_folder, one_thread, popen, records, run_until,  # noqa: F401
                      steps_text, train_args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 60 train images: 15 steps of 4 per epoch, so a signal after a few steps lands mid-epoch.
    return make_folder(tmp_path_factory.mktemp("resume") / "data", train_per_class=20)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run `good` (copy it before writing to it)."""
    out = tmp_path_factory.mktemp("finished")
    run = cli(train_args(data, out, "good", "--mix", "vanilla", batch=4, epochs=1))
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "good"


def run_main(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def test_resume_names_a_run_or_a_checkpoint_and_refuses_what_is_not_there(data, finished, tmp_path, capsys, one_thread):
    shutil.copytree(finished, tmp_path / "good")
    (tmp_path / "seed1").mkdir()  # a run beside the new one whose name differs in a digit: a sibling
    (tmp_path / "seed1" / "metrics.jsonl").write_text("{}\n")
    # --resume auto with a name one typo from a run: refused before any work, naming both.
    code, out, err = run_main(train_args(data, tmp_path, "godo", "--resume", "auto", epochs=1), capsys)
    msg = one_error(code, err)
    assert f"no run {tmp_path / 'godo'}" in msg and f"--experiment good?" in msg and "leave out --resume" in msg
    assert not (tmp_path / "godo").exists() and out == ""
    # --resume FILE or RUN that is not there: one line, as timm's --resume.
    for missing in (str(tmp_path / "good" / "last-typo.pt"), "doesnotexist"):
        code, out, err = run_main(train_args(data, tmp_path, "x", "--resume", missing), capsys)
        assert "no such checkpoint file or run folder" in one_error(code, err) and missing in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_main(train_args(data, tmp_path, "x", "--resume", str(tmp_path / "empty")), capsys)
    assert "holds no valid checkpoint" in one_error(code, err)
    assert not (tmp_path / "x").exists()
    # --resume auto where nothing exists (a preemptible job's first start): a fresh run, said once.
    code, out, err = run_main(train_args(data, tmp_path, "seed2", "--resume", "auto", "--mix", "vanilla",
                                         batch=4, epochs=1), capsys)
    assert code == 0, err
    assert err.count("starting fresh") == 1 and "done: vanilla tinynet, 1 epoch" in out
    # --resume RUN: a run folder by its name under --output, continued from its newest checkpoint.
    code, out, err = run_main(["train", "--resume", "good", "--output", str(tmp_path), "--epochs", "2",
                               "--log-interval", "5"], capsys)
    assert code == 0, err
    assert f"resumed from {tmp_path / 'good' / 'last.pt'} at epoch 2, batch 0" in out and "epoch 2/2 done" in out
    assert load_checkpoint(tmp_path / "good" / "last.pt")["next_epoch"] == 2


def test_a_failed_start_leaves_nothing_that_blocks_its_rerun(data, tmp_path, capsys, monkeypatch, one_thread):
    pytest.importorskip("tensorboard")
    args = train_args(data, tmp_path, "tb", "--mix", "vanilla", "--log-tensorboard", batch=4, epochs=1)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it fails
    code, out, err = run_main(args, capsys)
    assert "needs the tensorboard package" in one_error(code, err)
    assert not (tmp_path / "tb").exists()  # checked before the run folder is created
    monkeypatch.undo()
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    # A start that fails after its folder was created (here: the metric log) leaves only
    # config.yaml: not a run, so the same command runs in that folder.
    args = train_args(data, tmp_path, "late", "--mix", "vanilla", batch=4, epochs=1)

    def fail(self, *a, **kw):
        raise ConfigError("simulated failure before the first step")

    monkeypatch.setattr(metrics.MetricLogger, "__init__", fail)
    code, out, err = run_main(args, capsys)
    assert "simulated failure" in one_error(code, err)
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["config.yaml"]
    monkeypatch.undo()
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert (tmp_path / "late" / "last.pt").exists() and len(records(tmp_path / "late")) == 15
    # A folder with metrics but no checkpoint (killed before its first one): the advice is not
    # "--resume auto", which cannot continue it.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "metrics.jsonl").write_text("{}\n")
    code, out, err = run_main(train_args(data, tmp_path, "killed", epochs=1), capsys)
    msg = one_error(code, err)
    assert "no checkpoint to continue from: delete it" in msg and "--resume" not in msg


def test_ctrl_c_exits_130_and_the_resumed_epoch_says_what_ran(data, tmp_path):
    args = train_args(data, tmp_path, "int", "--mix", "vanilla", batch=4)
    proc = popen(args)
    try:
        run_until(proc, "epoch 1/2 [")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "stopped by SIGINT; checkpoint written" in out
    at = load_checkpoint(tmp_path / "int" / "last.pt")["next_batch"]
    assert 0 < at < 15
    assert f"epoch 1/2 stopped at step {at} of 15: {steps_text(at)} in " in out
    resumed = cli(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The resident loader starts at the batch resumed at: nothing is replayed.
    assert f"epoch 1/2 done: {steps_text(15 - at)} (resumed at step {at} of 15) in " in resumed.stdout
    assert "epoch 2/2 done: 15 steps in " in resumed.stdout


def test_a_finished_run_is_left_alone_and_a_fork_continues_elsewhere(data, finished, tmp_path, one_thread, capsys,
                                                                     monkeypatch):
    run = tmp_path / "good"
    shutil.copytree(finished, run)
    before = snapshot(run)
    argv = ["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "good"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert out.strip().splitlines() == [
        f"run {run} is finished (1 of 1 epochs trained): nothing to train; "
        "to train it longer, run the same command with --epochs N (more than 1)"]
    assert snapshot(run) == before
    # A finished checkpoint under another name without --epochs: the same line, no folder made.
    code, out, err = run_main(["train", "--resume", str(run / "last.pt"), "--experiment", "other"], capsys)
    assert code == 0 and "is finished" in out and not (tmp_path / "other").exists(), err
    # With --epochs: a fork. The new folder starts with a copy of the state as its own last.pt.
    source = load_checkpoint(run / "last.pt")
    saved = []
    real = metrics.MetricLogger.__init__

    def note_first_checkpoint(self, run_dir, **kw):  # the metric log is created right after it
        saved.append(load_checkpoint(Path(run_dir) / "last.pt"))
        real(self, run_dir, **kw)

    monkeypatch.setattr(metrics.MetricLogger, "__init__", note_first_checkpoint)
    code, out, err = run_main(["train", "--resume", str(run / "last.pt"), "--experiment", "other",
                               "--epochs", "2", "--log-interval", "5"], capsys)
    assert code == 0, err
    assert f"forked from {run / 'last.pt'} (left as it is) at epoch 2, batch 0" in out
    assert f"run folder: {tmp_path / 'other'}" in out and "epoch 2/2 done: 15 steps" in out
    first = saved[0]
    assert (first["next_epoch"], first["next_batch"], first["config"]["experiment"]) == (1, 0, "other")
    assert_states_equal(first["mixer"], source["mixer"])
    assert first["history"] == source["history"]
    assert load_checkpoint(tmp_path / "other" / "last.pt")["next_epoch"] == 2
    assert (tmp_path / "other" / "summary.json").exists() and (tmp_path / "other" / "config.yaml").exists()
    assert snapshot(run) == before  # the source folder is never written


def test_a_forced_change_of_the_optimizer_settings_is_what_the_resumed_run_uses(data, tmp_path, capsys, one_thread):
    """--allow-config-change with new weight decay and momentum (the Mix Block's too): the
    resumed optimizer's groups take them, not the checkpoint's (config.yaml says the new ones)."""
    first = train_args(data, tmp_path, "am", "--mix", "automix", batch=8, epochs=1)
    code, out, err = run_main(first, capsys)
    assert code == 0, err
    saved = load_checkpoint(tmp_path / "am" / "last.pt")["optimizer"]["param_groups"]
    assert [(g["name"], g["weight_decay"], g["momentum"]) for g in saved] == [
        ("model", 0.0005, 0.9), ("model", 0.0, 0.9), ("mix_block", 0.0005, 0.9)]
    changed = ["--weight-decay", "0.1", "--momentum", "0.5", "--mix-block-weight-decay", "0.2",
               "--mix-block-momentum", "0.3"]
    code, out, err = run_main(train_args(data, tmp_path, "am", "--mix", "automix", "--resume", "auto",
                                         "--allow-config-change", *changed, batch=8, epochs=2), capsys)
    assert code == 0, err
    groups = load_checkpoint(tmp_path / "am" / "last.pt")["optimizer"]["param_groups"]
    assert [(g["name"], g["weight_decay"], g["momentum"]) for g in groups] == [
        ("model", 0.1, 0.5), ("model", 0.0, 0.5), ("mix_block", 0.2, 0.3)]
    # A changed optimizer cannot take the checkpoint's state: one line, before any step.
    code, out, err = run_main(train_args(data, tmp_path, "am", "--mix", "automix", "--resume", "auto",
                                         "--allow-config-change", "--opt", "adamw", batch=8, epochs=3), capsys)
    msg = one_error(code, err)
    assert "--opt cannot change on resume (sgd -> adamw)" in msg and "--initial-checkpoint" in msg
    assert load_checkpoint(tmp_path / "am" / "last.pt")["next_epoch"] == 2


def test_resuming_an_earlier_checkpoint_of_the_folder_sets_the_later_continuation_aside(data, tmp_path, capsys,
                                                                                        one_thread):
    """--resume RUN/checkpoint-0001.pt in a run that went on to epoch 3: the new epoch 2 is kept
    (even with --checkpoint-hist 1), the old continuation's files are renamed, not deleted, and
    --resume auto then continues the new one."""
    run = tmp_path / "run"
    code, out, err = run_main(train_args(data, tmp_path, "run", "--mix", "vanilla", epochs=3), capsys)
    assert code == 0, err
    abandoned = load_checkpoint(run / "checkpoint-0003.pt")
    code, out, err = run_main(["train", "--resume", str(run / "checkpoint-0001.pt"), "--epochs", "2",
                               "--checkpoint-hist", "1"], capsys)
    assert code == 0, err
    assert ("set aside (not deleted) the later checkpoints this run replaces: last.pt -> last.superseded.pt, "
            "checkpoint-0003.pt -> checkpoint-0003.superseded.pt, checkpoint-0002.pt -> checkpoint-0002.superseded.pt"
            in out)
    assert sorted(p.name for p in run.glob("*.pt")) == [
        "best.pt", "checkpoint-0002.pt", "checkpoint-0002.superseded.pt", "checkpoint-0003.superseded.pt",
        "last.pt", "last.superseded.pt"]
    assert (run / "checkpoint-0002.pt").samefile(run / "last.pt")
    assert_states_equal(load_checkpoint(run / "checkpoint-0003.superseded.pt")["mixer"], abandoned["mixer"])
    code, out, err = run_main(train_args(data, tmp_path, "run", "--mix", "vanilla", "--resume", "auto", epochs=3),
                              capsys)
    assert code == 0, err
    assert f"resumed from {run / 'last.pt'} at epoch 3, batch 0" in out and "set aside" not in out


def test_a_mid_epoch_state_resumes_only_with_the_process_count_that_wrote_it(data, finished, tmp_path, capsys,
                                                                          one_thread):
    """Each rank's shard of an epoch and the global step of a batch depend on the process count,
    so a mid-epoch state (a handmade one here: "written" by 2 processes) is refused by one process;
    at an epoch's end any count resumes, with its own steps per epoch. A state without the count
    (written before it was stored) is not checked."""
    from automix_fast.engine.checkpoint import save_checkpoint

    state = load_checkpoint(finished / "last.pt")
    assert state["world_size"] == 1
    mid = tmp_path / "mid.pt"
    save_checkpoint(mid, {**state, "next_epoch": 0, "next_batch": 5, "world_size": 2})
    code, out, err = run_main(["train", "--resume", str(mid), "--output", str(tmp_path), "--experiment", "other"],
                              capsys)
    msg = one_error(code, err)
    assert f"{mid} was written mid-epoch (epoch 1, batch 5) by 2 processes and this run has 1" in msg, msg
    assert "torchrun --nproc_per_node 2" in msg and "checkpoint-NNNN.pt" in msg
    assert not (tmp_path / "other").exists()
    # Without the count: resumed as before.
    save_checkpoint(mid, {k: v for k, v in state.items() if k != "world_size"} | {"next_epoch": 0, "next_batch": 5})
    code, out, err = run_main(["train", "--resume", str(mid), "--output", str(tmp_path), "--experiment", "old",
                               "--log-interval", "5"], capsys)
    assert code == 0 and "at epoch 1, batch 5" in out, err

    # At an epoch's end with another count: resumed, and the records logged after that epoch
    # (numbered with the other count's steps per epoch) are dropped by their epoch.
    run = tmp_path / "good"
    shutil.copytree(finished, run)
    save_checkpoint(run / "last.pt", {**state, "world_size": 2})
    with open(run / "metrics.jsonl", "a") as f:  # 2 processes went on into epoch 2 (7 steps an epoch)
        f.write('{"type": "train", "epoch": 2, "step": 9, "time": 0, "values": {"loss": 1.0}}\n')
    code, out, err = run_main(["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "good",
                               "--epochs", "2", "--log-interval", "5"], capsys)
    assert code == 0, err
    assert f"{run / 'last.pt'} was written by 2 processes and this run has 1: 15 steps per epoch from here" in out
    epoch2 = [r for r in records(run) if r["epoch"] == 2]
    assert [r["step"] for r in epoch2] == [20, 25, 30], epoch2  # the record of step 9 is gone


def test_a_resume_on_other_class_folders_is_refused_even_when_forced(data, finished, tmp_path, capsys, one_thread):
    """Labels are the sorted class folder names: a folder renamed (or another dataset with as many
    classes) would silently give the resumed head's outputs other meanings. Refused in one line
    naming the first label that changes, --allow-config-change or not, before the run folder is
    written; the same names in another folder resume."""
    run = tmp_path / "good"
    shutil.copytree(finished, run)
    before = snapshot(run)
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    for split in ("train", "val"):
        (renamed / split / "class0").rename(renamed / split / "zebra")  # sorted: class1, class2, zebra
    argv = ["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "good", "--epochs", "2",
            "--allow-config-change", "--log-interval", "5"]
    code, out, err = run_main(argv + ["--data-dir", str(renamed)], capsys)
    msg = one_error(code, err)
    assert f"the classes of {renamed}" in msg and "label 0 is 'class1' in the data and 'class0' in the checkpoint" in msg
    assert "even with --allow-config-change" in msg, msg
    assert snapshot(run) == before
    same = tmp_path / "copy"
    shutil.copytree(data, same)
    code, out, err = run_main(argv + ["--data-dir", str(same)], capsys)
    assert code == 0 and "epoch 2/2 done" in out, err


def test_a_finished_run_without_its_summary_gets_it_back_from_the_checkpoint(data, finished, tmp_path, capsys,
                                                                             one_thread):
    """summary.json is the last file a run writes: a kill or a failed write there left a finished
    run without it for good. `--resume auto` writes it from the checkpoint (the same but for the
    training time, which is not stored), and only for a run that finished its own epochs, in its
    own folder; a killed write's temp file goes too. Nothing else is written."""
    from automix_fast.engine.checkpoint import save_checkpoint

    run = tmp_path / "good"
    shutil.copytree(finished, run)
    original = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    (run / ".summary.json.4194305.tmp").write_text("{")  # a PID above Linux's largest: its writer is gone
    before = snapshot(run)
    argv = ["train", "--resume", "auto", "--output", str(tmp_path), "--experiment", "good"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "removed 1 temp file of writes cut short by a killed process: .summary.json.4194305.tmp",
        f"wrote the missing {run / 'summary.json'} from {run / 'last.pt'} (train_seconds: null, not stored)"]
    rebuilt = json.loads((run / "summary.json").read_text())
    assert rebuilt.pop("rebuilt_from") == str(run / "last.pt") and rebuilt.pop("train_seconds") is None
    assert rebuilt == {k: v for k, v in original.items() if k not in ("train_seconds", "is_main")} | {
        "run_dir": str(run)}
    assert {k: v for k, v in snapshot(run).items() if k != "summary.json"} == {
        k: v for k, v in before.items() if not k.endswith(".tmp")}
    # Not for a fork's source folder, nor for a run stopped short of its own epochs (told --epochs 1 now).
    (run / "summary.json").unlink()
    code, out, err = run_main(["train", "--resume", str(run / "last.pt"), "--experiment", "other"], capsys)
    assert code == 0 and "is finished" in out and not (run / "summary.json").exists(), err
    state = load_checkpoint(run / "last.pt")
    save_checkpoint(run / "last.pt", {**state, "config": {**state["config"], "epochs": 2}})
    code, out, err = run_main(argv + ["--epochs", "1"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 and not (run / "summary.json").exists(), (out, err)
