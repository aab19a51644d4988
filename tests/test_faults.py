"""Faults during training: SIGTERM/SIGKILL of a real training process, a corrupt newest checkpoint,
non-finite losses (bf16/fp32 skip, fp16 GradScaler), too many bad steps, and determinism.

Subprocess tests run the real CLI; the others call `automix_fast.cli.main` in this process with one
CPU thread (see faultkit). All runs are tiny: tinynet, 32 px, a generated 3-class folder.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from automix_fast.cli import main
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.mixing.baselines import Vanilla
from faultkit import (all_finite, assert_states_equal, cli, make_folder, one_thread, popen, records,  # noqa: F401
                      run_until as _run_until, train_args, train_losses, weights)

AUTOMIX = ("--mix", "automix", "--seed", "5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 120 train images: 30 steps of 4 per epoch, so a signal after the first step lands mid-epoch.
    return make_folder(tmp_path_factory.mktemp("faults") / "data", train_per_class=40)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted AutoMix run that the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref")
    run = cli(train_args(data, out, "ref", *AUTOMIX, batch=4))
    assert run.returncode == 0, run.stderr
    return out / "ref"


def test_sigterm_mid_epoch_then_resume_auto_matches_uninterrupted(data, reference, tmp_path):
    proc = popen(train_args(data, tmp_path, "pre", *AUTOMIX, batch=4))
    try:
        _run_until(proc, "epoch 1/2 [")
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert time.monotonic() - t_signal < 30
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM, after the checkpoint is written
    assert "received SIGTERM" in out and "stopped by SIGTERM" in out and "--resume auto" in out
    state = load_checkpoint(tmp_path / "pre" / "last.pt")
    assert state["next_epoch"] == 0 and 0 < state["next_batch"] < 30  # a mid-epoch checkpoint
    assert not (tmp_path / "pre" / "summary.json").exists()

    resumed = cli(train_args(data, tmp_path, "pre", *AUTOMIX, "--resume", "auto", batch=4))
    assert resumed.returncode == 0, resumed.stderr
    assert f"batch {state['next_batch']}" in resumed.stdout and "done:" in resumed.stdout
    # CPU runs are reproducible across the interruption: same per-step losses, same final bits.
    assert train_losses(tmp_path / "pre") == train_losses(reference)
    assert_states_equal(weights(tmp_path / "pre" / "last.pt"), weights(reference / "last.pt"))


def test_sigkill_leaves_valid_checkpoints_and_resume_finishes(data, tmp_path):
    args = train_args(data, tmp_path, "kill", "--mix", "vanilla", batch=4, epochs=3)
    proc = popen(args)
    try:
        _run_until(proc, "epoch 2/3 [")  # epoch 1's checkpoints are written before epoch 2 starts
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run = tmp_path / "kill"
    for path in [run / "last.pt", *run.glob("checkpoint-*.pt")]:
        load_checkpoint(path)  # the newest file under each final name is complete and verified
    assert load_checkpoint(run / "last.pt")["next_epoch"] >= 1
    # What a kill during a checkpoint write leaves (the atomic writer's temp file, named with the
    # killed trainer's PID), beside one of a process that still runs and names that only look alike.
    (run / f".last.pt.{proc.pid}.tmp").write_bytes((run / "last.pt").read_bytes()[:1000])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    kept = [f".last.pt.{live.pid}.tmp", ".last.pt.tmp", f"last.pt.{proc.pid}.tmp", f".last.pt.{proc.pid}.tmp.1"]
    try:
        for name in kept:
            (run / name).write_bytes(b"x")
        resumed = cli(args + ["--resume", "auto"])
    finally:
        live.kill()
        live.wait()
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert f"removed 1 temp file of writes cut short by a killed process: .last.pt.{proc.pid}.tmp" in resumed.stdout
    assert not (run / f".last.pt.{proc.pid}.tmp").exists() and all((run / name).exists() for name in kept)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert load_checkpoint(run / "last.pt")["next_epoch"] == 3


def test_corrupt_newest_checkpoints_fall_back_to_previous_epoch(data, reference, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    blob = bytearray((run / "last.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a bit flip in the payload
    (run / "last.pt").write_bytes(bytes(blob))
    with open(run / "checkpoint-0002.pt", "r+b") as f:  # a truncated write
        f.truncate(1000)
    resumed = cli(train_args(data, tmp_path, "ref", *AUTOMIX, "--resume", "auto", batch=4))
    assert resumed.returncode == 0, resumed.stderr
    assert "last.pt is corrupt (checksum mismatch" in resumed.stderr
    assert "checkpoint-0002.pt is corrupt (truncated" in resumed.stderr
    assert f"falling back to {run / 'checkpoint-0001.pt'}" in resumed.stderr
    assert "checkpoint-0001.pt at epoch 2, batch 0" in resumed.stdout
    # Epoch 2 retrained from epoch 1's checkpoint lands on the same bits as the original run.
    assert_states_equal(weights(run / "last.pt"), weights(reference / "last.pt"))


# ----------------------------------------------------------------------------- numerical faults

def _poison(monkeypatch, bad_steps, factor=float("nan")):
    """Make Vanilla's loss non-finite on the given global steps (0-based)."""
    original = Vanilla.loss

    def loss(self, x, y, step, total_steps):
        value, logs = original(self, x, y, step, total_steps)
        if step in bad_steps:
            value = value * factor
            logs = {**logs, "loss": value.detach()}
        return value, logs

    monkeypatch.setattr(Vanilla, "loss", loss)


def test_nonfinite_steps_are_skipped_and_counted(data, tmp_path, monkeypatch, capsys, one_thread):
    _poison(monkeypatch, {2, 3, 40})  # 30 steps per epoch; never 3 in a row
    assert main(train_args(data, tmp_path, "skip", "--mix", "vanilla", "--max-bad-steps", "3", batch=4)) == 0
    run = tmp_path / "skip"
    skipped = [r["values"]["skipped_steps"] for r in records(run)]
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[3] == 2 and skipped[-1] == 3
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 3
    state = load_checkpoint(run / "last.pt")
    assert state["skipped_steps"] == 3 and all_finite(state["mixer"]) and all_finite(state["optimizer"]["state"][0])


def test_skipped_step_leaves_weights_untouched(data, tmp_path, monkeypatch, one_thread):
    """A bad step changes neither the weights nor the optimizer state: the run equals one with that
    batch's update removed, which we check on the first step (nothing to compare it with but the init)."""
    from automix_fast.config import build_config
    from automix_fast.engine.runner import Trainer

    _poison(monkeypatch, {0})
    cfg = build_config(overrides=dict(data_dir=str(data), img_size=32, epochs=1, batch_size=4, kernel_backend="torch",
                                      loader="torch", workers=0, device="cpu", mix="vanilla", output=str(tmp_path),
                                      experiment="one", visualize=False, log_interval=1))
    trainer = Trainer(cfg, quiet=True)
    before = {k: v.clone() for k, v in trainer.mixer.model.named_parameters()}
    from automix_fast.engine.train import EpochCallbacks, EpochPlan, train_one_epoch
    from automix_fast.engine.train_step import StepContext

    ctx = StepContext(trainer.mixer, trainer.optimizer, trainer.schedule, trainer.guard, trainer.total_steps)
    result = train_one_epoch(ctx, trainer.train_loader, EpochPlan(epoch=0, start_step=0),
                             EpochCallbacks(should_stop=lambda: True))  # stop after the first (bad) step
    assert result.steps == 1 and trainer.guard.skipped.item() == 1
    for k, v in trainer.mixer.model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert not trainer.optimizer.state  # no momentum buffer was created by the skipped step


def test_too_many_bad_steps_stops_with_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys, one_thread):
    _poison(monkeypatch, set(range(30, 60)))  # all of epoch 2
    code = main(train_args(data, tmp_path, "nan", "--mix", "vanilla", "--max-bad-steps", "3", batch=4))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: 3 consecutive steps had a non-finite loss"), err
    assert "max_bad_steps" in err[0] and f"last good checkpoint is {tmp_path / 'nan' / 'last.pt'} (end of epoch 1)" in err[0]
    run = tmp_path / "nan"
    state = load_checkpoint(run / "last.pt")
    assert state["next_epoch"] == 1 and all_finite(state["mixer"])
    assert not (run / "checkpoint-0002.pt").exists() and not (run / "summary.json").exists()
    assert records(run)[-1]["values"]["skipped_steps"] == 3  # stopped at the 3rd bad step


def test_overflowing_lr_stops_without_writing_nan(data, tmp_path, capsys, one_thread):
    """A real blow-up (lr 1e30): the weights are never updated with NaN and nothing non-finite is saved."""
    code = main(train_args(data, tmp_path, "boom", "--mix", "vanilla", "--lr", "1e30", "--max-bad-steps", "3", batch=4))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "consecutive steps had a non-finite loss" in err[0], err
    assert "no checkpoint was written" in err[0]
    assert not list((tmp_path / "boom").glob("*.pt"))


def test_fp16_grad_scaler_skips_overflow_and_counts_it(data, tmp_path, monkeypatch, one_thread):
    _poison(monkeypatch, {1}, factor=float("inf"))  # scaled gradients overflow on step 1
    args = train_args(data, tmp_path, "fp16", "--mix", "vanilla", "--amp", "--amp-dtype", "float16", batch=4, epochs=1)
    assert main(args) == 0
    state = load_checkpoint(tmp_path / "fp16" / "last.pt")
    skipped = state["skipped_steps"]
    # The injected overflow, plus any real fp16 overflow at the initial scale of 2**16: each one is a
    # skipped step and halves the scale (no growth within growth_interval=2000 steps).
    assert skipped >= 1 and records(tmp_path / "fp16")[-1]["values"]["skipped_steps"] == skipped
    assert state["scaler"]["scale"] == 2.0 ** (16 - skipped)
    assert all_finite(state["mixer"])


# ----------------------------------------------------------------------------- determinism

def test_deterministic_cpu_runs_are_bitwise_identical(data, tmp_path, one_thread):
    args = ["--mix", "automix", "--seed", "1", "--deterministic"]
    for name in ("a", "b"):
        assert main(train_args(data, tmp_path, name, *args, batch=8, epochs=1)) == 0
    assert_states_equal(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
