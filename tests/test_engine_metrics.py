import io
import json
import os
import shutil
import time

import pytest
import torch

from automix_fast.engine.hooks import EvalTimes, evaluates
from automix_fast.engine.metrics import Mean, MeanDict, MetricLogger, ProgressLine, accuracy_topk, duration_text, elapsed_text


def test_accuracy_topk_by_hand():
    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # ranking 1,0,...   target 1: top1
        [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],  # ranking 0,2,1     target 2: top2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # ranking 5,4,3,2,1 target 1: top5
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target 0: rank 6, missed by top-5
    ])
    targets = torch.tensor([1, 2, 1, 0])
    out = accuracy_topk(logits, targets, ks=(1, 2, 5))
    assert out.dtype == torch.int64 and out.tolist() == [1, 2, 3]
    # one-hot targets and k beyond the class count
    assert accuracy_topk(logits[:, :3], torch.eye(3)[[1, 2, 1, 0]], ks=(1, 5)).tolist() == [1, 4]


def test_means_accumulate_tensors():
    m = Mean()
    for v in [1.0, 2.0, 3.0]:
        m.add(torch.tensor(v))
    m.add(10.0, n=2)
    assert m.value() == (6.0 + 20.0) / 5
    d = MeanDict()
    d.add({"a": torch.tensor(1.0), "b": 2})
    d.add({"a": torch.tensor(3.0), "b": 4})
    assert d.values() == {"a": 2.0, "b": 3.0}


def test_metric_logger_json_lines(tmp_path):
    with MetricLogger(tmp_path) as log:
        log.log("train", {"loss": torch.tensor(2.5), "lr": 0.1, "bad": float("nan")}, epoch=0, step=10)
        log.log("eval", {"q_one/top1": 0.75, "acc": torch.tensor([1.0, 2.0])}, epoch=0)
    MetricLogger(tmp_path, enabled=False).log("train", {"x": 1})  # other ranks: no-op
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 2
    assert recs[0]["type"] == "train" and recs[0]["epoch"] == 0 and recs[0]["step"] == 10
    assert recs[0]["values"] == {"loss": 2.5, "lr": 0.1, "bad": "nan"} and "time" in recs[0]
    assert recs[1]["values"] == {"q_one/top1": 0.75, "acc": [1.0, 2.0]} and recs[1]["step"] is None
    with MetricLogger(tmp_path) as log:  # appends
        log.log("train", {}, epoch=1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_progress_line_not_tty():
    out = io.StringIO()
    p = ProgressLine(2, 10, 7, log_interval=3, stream=out)
    for i in range(7):
        p.update(loss=torch.tensor(float(i)), lr=0.1, images=32, data_time=0.0)
    s = p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 3  # steps 3 and 6, then the summary
    assert lines[0].startswith("epoch 2/10 [########------------] 3/7 loss 1.000 lr 0.1 img/s ")
    assert lines[0].endswith(" data 0% eta 0:00 (run 0:00)")  # 9 epochs of 7 steps at microseconds a step
    assert " 6/7 loss 4.000 " in lines[1]  # mean over the window since the previous line
    assert lines[2].startswith("epoch 2/10 done: 7 steps in ") and " loss 3.0000 " in lines[2]
    assert s["loss"] == 3.0 and s["steps"] == 7 and s["lr"] == 0.1


def test_progress_line_epoch_loss_weights_each_interval_by_its_steps():
    """As the training loop calls it: the loss only at each log step, as the mean of the interval
    (10 steps, then the epoch's last 4). The epoch's loss weights each mean by its steps (as
    summary.csv's train_loss does), not each interval alike."""
    out = io.StringIO()
    p = ProgressLine(1, 1, 14, log_interval=10, stream=out)
    for step in range(1, 15):
        p.update(loss=1.0 if step == 10 else 2.4 if step == 14 else None, images=4)
    assert p.close()["loss"] == (10 * 1.0 + 4 * 2.4) / 14
    assert " loss 1.4000 " in out.getvalue().splitlines()[-1]


def test_progress_line_of_a_resumed_and_a_stopped_epoch():
    """A resumed epoch counts the steps that ran here (img/s over them), and says how long a replay
    of the batches done took when its loader replayed them; one that ends early says where."""
    out = io.StringIO()
    p = ProgressLine(1, 4, 10, log_interval=100, stream=out, start_step=4)
    for _ in range(6):
        p.update(loss=1.0, images=8)
    assert p.close()["steps"] == 6
    assert out.getvalue().startswith("epoch 1/4 done: 6 steps (resumed at step 4 of 10) in ")
    out = io.StringIO()
    p = ProgressLine(1, 4, 10, log_interval=100, stream=out, start_step=4)
    p.start_clock(replayed=True)  # the loader read the 4 steps' batches again to get there
    p.update(loss=1.0, images=8)
    p.close()
    assert out.getvalue().startswith("epoch 1/4 stopped at step 5 of 10: 1 step (resumed at step 4 of 10, "
                                     "its data replayed in ")
    out = io.StringIO()
    p = ProgressLine(2, 4, 10, log_interval=100, stream=out)
    for _ in range(3):
        p.update(loss=1.0, images=8)
    p.close()
    assert out.getvalue().startswith("epoch 2/4 stopped at step 3 of 10: 3 steps in ")


def test_progress_line_tty_and_disabled():
    out = io.StringIO()
    p = ProgressLine(1, 1, 3, stream=out, is_tty=True, min_interval=3600)
    for _ in range(3):
        p.update(loss=1.0)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2  # first step, then the final step; throttled in between
    assert "3/3" in text and text.endswith("\n") and "done:" in text.splitlines()[-1]
    quiet = io.StringIO()
    p = ProgressLine(1, 1, 3, stream=quiet, enabled=False)
    p.update(loss=1.0)
    assert p.close()["loss"] == 1.0 and quiet.getvalue() == ""


def _draw_long_lines(out, *, is_tty):
    terms = ("l_mix_q", "l_one_q", "l_mix_k", "l_mask")
    p = ProgressLine(3, 100, 500, log_interval=2, stream=out, is_tty=is_tty, min_interval=0.0, world_size=2,
                     terms=terms)
    note = "mask 0.51/0.60 px-sd 7.79e-06 img-sd 0.00265 sat 0%"
    for i in range(6):
        values = {"l_mix_q": 2.424, "l_one_q": 2.435, "l_mix_k": 2.307, "l_mask": 0.005, "loss": 7.171}
        p.update(loss=7.171, lr=0.05, images=64, data_time=0.001, note=note, values=values)
    p.close()
    return out.getvalue()


@pytest.mark.parametrize("columns", [80, 200])
def test_progress_line_fits_the_terminal_width(monkeypatch, columns):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((columns, 24)))
    text = _draw_long_lines(io.StringIO(), is_tty=True)
    drawn = text.split("\n")[0].split("\r")[1:]  # each redraw of the line
    assert len(drawn) == 6
    assert all(len(d) < columns for d in drawn), [len(d) for d in drawn]  # never wraps
    line = drawn[-1]
    assert line.startswith("epoch 3/100 ") and " 6/500 loss 7.171" in line and "img/s" in line
    if columns == 200:  # room for the loss terms and the global rate's label
        assert "loss 7.171 = l_mix_q 2.424 + l_one_q 2.435 + l_mix_k 2.307 + l_mask 0.005" in line
        assert "(2 procs)" in line and "lr 0.05" in line and " eta 0:00 (run " in line
    else:  # the mask note, the terms, data%, the bar (and here lr) go first; the count, loss, rate and eta stay
        assert "l_mix_q" not in line and "mask" not in line and "data" not in line and "lr 0.05" not in line
        assert " (2 procs) eta 0:00 (run 0:" in line


def test_progress_line_off_a_tty_prints_whole_plain_lines(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((80, 24)))
    text = _draw_long_lines(io.StringIO(), is_tty=False)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # steps 2, 4, 6 and the summary
    assert all(" = l_mix_q 2.424 + l_one_q 2.435 + l_mix_k 2.307 + l_mask 0.005 " in line for line in lines[:3])
    assert all(line.endswith(" sat 0%") and "(2 procs)" in line for line in lines[:3])
    assert "(2 procs)" in lines[3]


def test_progress_rate_counts_every_process():
    out = io.StringIO()
    p = ProgressLine(1, 1, 4, log_interval=4, stream=out, world_size=3)
    for _ in range(4):
        p.update(loss=1.0, images=10)
    s = p.close()
    assert s["img_per_s"] * s["time_s"] == pytest.approx(3 * 40)  # all 3 processes' images
    one = ProgressLine(1, 1, 4, log_interval=4, stream=io.StringIO())
    one.update(loss=1.0, images=10)
    assert "procs" not in one.rate_text(10, 1.0) and one.rate_text(10, 1.0) == "img/s 10"
    assert p.rate_text(10, 1.0) == "img/s 30 (3 procs)"


def _clocked_steps(progress, seconds):
    """Run one step per entry of `seconds`, a stand-in console clock moving that long before each
    step ends (the loop calls update() when a step has finished)."""
    for s in seconds:
        _CLOCK[0] += s
        progress.update(loss=1.0, images=8)


_CLOCK = [0.0]


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter as a stand-in that moves only when a test moves it."""
    _CLOCK[0] = 1000.0
    monkeypatch.setattr(time, "perf_counter", lambda: _CLOCK[0])
    return _CLOCK


def test_progress_eta_is_the_epochs_and_the_runs_steps_left_at_the_measured_step_time(clock):
    """Epoch 2 of 4, 10 steps: the first step takes 100 s (warm-up, compilation), the others 2 s.
    The eta counts from the end of the first step: 2 s a step, 7 left in the epoch (0:14) and
    7 + 2 x 10 in the run (0:54). The epoch's summary gives the run's time left at its own
    seconds per step (first step included: 118 s / 10 steps x 20 steps)."""
    out = io.StringIO()
    p = ProgressLine(2, 4, 10, log_interval=3, stream=out)
    _clocked_steps(p, [100.0] + [2.0] * 9)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" data 0% eta 0:14 (run 0:54)"), lines[0]
    assert lines[2].endswith(" eta 0:02 (run 0:42)"), lines[2]  # after step 9
    assert lines[3].startswith("epoch 2/4 done: 10 steps in 1:58 ") and lines[3].endswith(" run eta 3:56")


def test_progress_eta_after_a_mid_epoch_resume_counts_the_steps_run_here(clock):
    """Resumed at step 6 of 10 in epoch 1 of 3, after a 1000 s replay of the batches done: the
    replay is not a step, and the steps done before the stop are not counted as run here; at 3 s a
    step, 2 steps are left in the epoch (0:06) and 22 in the run (1:06)."""
    out = io.StringIO()
    p = ProgressLine(1, 3, 10, log_interval=4, stream=out, start_step=6)
    clock[0] += 1000.0
    p.start_clock(replayed=True)
    _clocked_steps(p, [3.0] * 4)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/3 [################----]  8/10 ") and lines[0].endswith(" eta 0:06 (run 1:06)")
    assert lines[1].endswith(" run eta 1:00"), lines[1]


def test_progress_eta_in_the_last_epoch_and_of_a_stopped_one(clock):
    """The last epoch's line has no run part (it is the epoch's) and its summary no run eta; nor
    has the summary of an epoch that stopped early. Before any step there is no eta."""
    out = io.StringIO()
    p = ProgressLine(3, 3, 4, log_interval=2, stream=out)
    assert p.eta_text(clock[0]) is None
    _clocked_steps(p, [5.0] * 4)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" eta 0:10") and "run" not in lines[0] and "eta" not in lines[2]
    out = io.StringIO()
    p = ProgressLine(1, 3, 4, log_interval=2, stream=out)
    _clocked_steps(p, [5.0] * 2)
    p.close()
    assert "eta" not in out.getvalue().splitlines()[-1]


def test_duration_text():
    assert [duration_text(s) for s in (0, 59.6, 125, 3725, 90000)] == ["0:00", "1:00", "2:05", "1:02:05", "25:00:00"]
    # a time taken: tenths of a second under a minute, never "60.0s"
    assert [elapsed_text(s) for s in (8.64, 59.94, 59.96, 5405)] == ["8.6s", "59.9s", "1:00", "1:30:05"]


def test_progress_run_eta_adds_the_evaluations_to_come(clock):
    """The run's figure (line and summary) adds the caller's estimate of the evaluations still to
    come; the epoch's own eta does not. Same steps as above: 2 s a step after a 100 s first one."""
    out = io.StringIO()
    p = ProgressLine(2, 4, 10, log_interval=3, stream=out, run_extra_s=60.0)
    _clocked_steps(p, [100.0] + [2.0] * 9)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" eta 0:14 (run 1:54)"), lines[0]
    assert lines[3].endswith(" run eta 4:56"), lines[3]


def test_eval_times_count_the_evaluations_still_to_come():
    """Every 3rd epoch and the last of 10 evaluate (ends of epochs 3, 6, 9, 10): from epoch index 4
    on, 3 are to come, each at the mean measured so far; none measured, nothing is added."""
    times = EvalTimes(eval_interval=3, epochs=10)
    assert times.seconds_left(0) == 0.0
    times.add(10.0)
    times.add(20.0)
    assert times.seconds_left(4) == 45.0
    assert times.seconds_left(9) == 15.0 and times.seconds_left(2) == 60.0
    assert [evaluates(e, 3, 10) for e in range(10)] == [False, False, True] * 3 + [True]
