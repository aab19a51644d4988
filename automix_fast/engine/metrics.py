"""Metrics: top-k counts, running means, the JSON-lines log and the console progress line.

Nothing here reads a device tensor per step: `.item()` on a CUDA tensor waits for the GPU
and stalls the pipeline, so values stay on the device and are read only when a line is
printed or written (a few times per second at most).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from automix_fast.atomic import write_failure
from automix_fast.engine.tensorboard_log import TensorBoardWriter


def accuracy_topk(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Correct-prediction counts for each k, as an int64 tensor of shape (len(ks),) on the
    logits' device (no host sync; sum over batches, all-reduce, then divide by the sample count).

    k larger than the number of classes counts as the number of classes (top-5 of 3 classes
    is always right). Soft/one-hot targets (N, C) are reduced to their argmax.
    """
    if targets.ndim == 2:
        targets = targets.argmax(dim=1)
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hit = top.eq(targets.view(-1, 1))
    # A row has at most one hit; the cumulative sum marks "hit within the first j".
    within = hit.cumsum(dim=1).sum(dim=0)  # (maxk,) correct counts for k = 1..maxk
    return torch.stack([within[min(k, maxk) - 1] for k in ks]).to(torch.int64)


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return v.item()
    return v


class Mean:
    """Running mean that accumulates on the value's device; `.value()` is the only host read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0  # a float until the first tensor arrives, then a device tensor
        self.count = 0

    def add(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float() * n
        else:
            value = float(value) * n
        self._sum = self._sum + value
        self.count += n

    def value(self) -> float:
        if self.count == 0:
            return float("nan")
        s = self._sum.item() if isinstance(self._sum, torch.Tensor) else self._sum
        return s / self.count


class MeanDict:
    """A `Mean` per key, for the `logs` dict a mixer returns each step."""

    def __init__(self):
        self.means: dict[str, Mean] = {}

    def add(self, values: dict, n: int = 1) -> None:
        for k, v in values.items():
            self.means.setdefault(k, Mean()).add(v, n)

    def values(self) -> dict[str, float]:
        return {k: m.value() for k, m in self.means.items()}

    def reset(self) -> None:
        self.means.clear()


def _json_safe(v):
    v = _to_float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": strict JSON has no NaN, and a diverged loss must stay visible
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class MetricLogger:
    """Appends one JSON object per line to `<run_dir>/metrics.jsonl`:

        {"type": "train", "epoch": 3, "step": 1500, "time": 1712345678.9, "values": {"loss": 2.3}}

    Each line is flushed as written, so a crash loses at most the line being written and the
    file can be tailed. With `enabled=False` (ranks other than 0) every call is a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, filename: str = "metrics.jsonl",
                 tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        self._file = None
        self._tensorboard = None  # with `tensorboard`, the same values as TensorBoard scalars
        if tensorboard and enabled:
            self._tensorboard = TensorBoardWriter(run_dir)

    def log(self, type: str, values: dict, *, epoch: int | None = None, step: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"type": type, "epoch": epoch, "step": step, "time": round(time.time(), 3),
                  "values": _json_safe(dict(values))}
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk or a read-only folder: one line naming the file
            raise (write_failure(self.path, e, "metrics") or e) from None
        if self._tensorboard is not None:
            self._tensorboard.log(type, record["values"], step)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # the failed write was already reported by log(); do not hide that error
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProgressLine:
    """Console progress for one epoch.

        epoch 3/100 [######--------------] 150/500 loss 2.345 = l_mix_q 1.203 + ... lr 0.1 img/s 2450 data 3%
            eta 2:10 (run 1:35:40)        (one line)

    On a TTY the line is redrawn in place with '\\r' at most every `min_interval` seconds and
    fits the terminal's width (read at each draw): the least important fields are left out
    first (the mask note, the loss terms, data%, the bar, lr, img/s, the eta), and what still does not
    fit is cut, so the line never wraps (a wrapped line cannot be redrawn). Off a TTY (CI, pipes,
    log files) a whole plain line is printed every `log_interval` steps: no '\\r', no escape codes.

    The loss shown is the mean since the previous line; a `loss` given after steps without one
    is the mean over all of them (the training loop reads it once per log interval), so the
    epoch's loss weights it by those steps (summary.csv's train_loss weights micro-batches: the
    same unless the epoch's last --grad-accum-steps step is short). With `terms` (the names of
    the values that sum to it, AutoMix's l_mix_q + l_one_q + l_mix_k + l_mask, as in
    metrics.jsonl) they follow it where the width allows. img/s counts every process's images:
    `world_size` x this process's (every rank runs the same number of equal batches), labelled
    "(N procs)" under torchrun; img/s and data% cover the same window as the loss.
    The clock starts when the line is made, or at `start_clock()`, which the training loop calls
    once the epoch's first batch can be read: a resumed epoch whose loader cannot start
    mid-epoch first replays the batches it had done (their data order), and that time is said
    apart (`start_clock(replayed=True)`), not counted in the rate.
    `eta` is the time left in the epoch and, before the last epoch, in the run (`run`: this epoch's
    steps left plus `total_steps` for each epoch after it), at the measured seconds per step of the
    steps run here since the clock started (from the end of the first of them once a second one
    ran: the first holds warm-up, compilation and the loader's start); host time only, no device
    sync. The run's figure adds `run_extra_s`, the caller's estimate of the evaluations (and their
    checkpoint writes) still to come, this epoch's included. The epoch summary ends with the run's
    time left at its epoch's seconds per step, plus `run_extra_s` (`run eta`), while epochs remain.
    `close()` prints the epoch summary and returns it as a dict for the metric log: the steps
    that ran in this process (a resumed epoch starts at `start_step`; img/s covers what ran),
    and for an epoch that ended early, where it stopped.
    With `enabled=False` (ranks other than 0) nothing is printed.
    """

    BAR = 20
    # Fields by how long they stay when the terminal is narrow: 0 always, higher ones leave first.
    KEEP, ETA, RATE, LR, BAR_FIELD, DATA, TERMS, NOTE = 0, 1, 2, 3, 4, 5, 6, 7

    def __init__(self, epoch: int, epochs: int, total_steps: int, *, log_interval: int = 50,
                 stream=None, is_tty: bool | None = None, enabled: bool = True, min_interval: float = 0.2,
                 start_step: int = 0, world_size: int = 1, terms: Sequence[str] = (), run_extra_s: float = 0.0):
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.run_extra_s = run_extra_s  # the run's seconds to come outside training steps (evaluations)
        self.log_interval = max(1, int(log_interval))
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None and hasattr(self.stream, "isatty") else bool(is_tty)
        self.enabled = enabled
        self.min_interval = min_interval
        self.world_size = max(1, int(world_size))
        self.terms = tuple(terms)
        self.step = self.start_step = start_step
        self.lr = None
        self.epoch_loss, self.window_loss = Mean(), Mean()
        self._since_loss = 0  # steps since the last loss given: the weight of the next one in the epoch's mean
        self.start = self._win_start = time.perf_counter()
        self.replay_s = 0.0  # seconds before start_clock(): a resumed epoch's replay of its done batches
        self.replayed = False  # whether that replay happened (a loader without start_at)
        self._last_draw = float("-inf")  # the first step always draws
        self._first_step_end = None  # when the first step run here ended: the eta's clock starts there
        self.images = self._win_images = 0
        self.data_time = self._win_data = 0.0
        self._drawn = 0  # length of the line currently on screen (TTY), to blank leftovers
        self._shown_loss = None
        self._shown_terms: dict[str, float] = {}
        self._note = ""

    def start_clock(self, replayed: bool = False) -> None:
        """The epoch's steps start now: its time, img/s and data% count from here; `replayed`: the
        time before this was spent replaying the batches a resumed epoch had done."""
        self.replayed = self.replayed or replayed
        now = time.perf_counter()
        self.replay_s += now - self.start
        self.start = self._win_start = now
        self._first_step_end = None

    def update(self, *, loss=None, lr: float | None = None, images: int = 0, data_time: float = 0.0,
               note: str | None = None, values: dict | None = None) -> None:
        """Record one finished step. `loss` may be a device tensor (read only when drawn),
        `images` this process's samples in the step, `data_time` host seconds spent waiting for
        the batch, `note` text shown at the end of the line until the next note (AutoMix's mask
        statistics), `values` the logged host floats holding the `terms`."""
        self.step += 1
        self._since_loss += 1
        if note is not None:
            self._note = note
        if values is not None:
            self._shown_terms = {k: values[k] for k in self.terms if k in values}
        if loss is not None:  # a step's loss, or the mean of the steps since the last one given
            self.epoch_loss.add(loss, self._since_loss)
            self.window_loss.add(loss)
            self._since_loss = 0
        if lr is not None:
            self.lr = lr
        self.images += images
        self._win_images += images
        self.data_time += data_time
        self._win_data += data_time
        now = time.perf_counter()
        if self._first_step_end is None:
            self._first_step_end = now
        if not self.enabled:
            return
        if self.is_tty:
            if now - self._last_draw >= self.min_interval or self.step == self.total:
                self._emit(self._line(now), now)
        elif self.step % self.log_interval == 0:
            self._emit(self._line(now), now)

    def rate_text(self, images: int, seconds: float) -> str:
        """`img/s N` for all processes' images (this one's x world_size), labelled under torchrun."""
        text = f"img/s {self.world_size * images / max(seconds, 1e-9):.0f}"
        return text + f" ({self.world_size} procs)" if self.world_size > 1 else text

    def step_seconds(self, now: float) -> float | None:
        """Seconds per step measured in this epoch: since the end of its first step run here once
        another one ran, else that first step's; None before any step."""
        ran = self.step - self.start_step
        if ran == 0:
            return None
        if ran == 1 or self._first_step_end is None:
            return (now - self.start) / ran
        return (now - self._first_step_end) / (ran - 1)

    def steps_left(self) -> tuple[int, int]:
        """Steps left in this epoch and in the run (every later epoch has `total_steps`)."""
        epoch_left = max(self.total - self.step, 0)
        return epoch_left, epoch_left + max(self.epochs - self.epoch, 0) * self.total

    def eta_text(self, now: float) -> str | None:
        """`eta M:SS` for the epoch, with `(run H:MM:SS)` before the last epoch; None before any step."""
        per_step = self.step_seconds(now)
        if per_step is None:
            return None
        epoch_left, run_left = self.steps_left()
        text = f"eta {duration_text(epoch_left * per_step)}"
        return text + f" (run {duration_text(run_left * per_step + self.run_extra_s)})" if run_left > epoch_left else text

    def fields(self, now: float) -> list[tuple[str, int]]:
        """The line's fields in display order, each with its rank (see KEEP ... NOTE)."""
        filled = int(self.BAR * min(self.step / max(self.total, 1), 1.0))
        width = len(str(self.total))
        parts = [(f"epoch {self.epoch}/{self.epochs}", self.KEEP),
                 (f"[{'#' * filled}{'-' * (self.BAR - filled)}]", self.BAR_FIELD),
                 (f"{self.step:>{width}}/{self.total}", self.KEEP)]
        if self.window_loss.count:
            self._shown_loss = self.window_loss.value()
        if self._shown_loss is not None:  # the newest loss read, until a newer one arrives
            parts.append((f"loss {self._shown_loss:.3f}", self.KEEP))
            if self._shown_terms:
                parts.append(("= " + " + ".join(f"{k} {v:.3f}" for k, v in self._shown_terms.items()), self.TERMS))
        if self.lr is not None:
            parts.append((f"lr {self.lr:.3g}", self.LR))
        elapsed = max(now - self._win_start, 1e-9)
        if self._win_images:
            parts.append((self.rate_text(self._win_images, elapsed), self.RATE))
        parts.append((f"data {100 * min(self._win_data / elapsed, 1.0):.0f}%", self.DATA))
        eta = self.eta_text(now)
        if eta is not None:
            parts.append((eta, self.ETA))
        if self._note:
            parts.append((self._note, self.NOTE))
        return parts

    def _line(self, now: float) -> str:
        parts = self.fields(now)
        if not self.is_tty:
            return " ".join(text for text, _ in parts)
        return fit_fields(parts, terminal_width())

    def _emit(self, line: str, now: float) -> None:
        if self.is_tty:
            self.stream.write("\r" + line + " " * max(0, min(self._drawn, terminal_width()) - len(line)))
            self._drawn = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_draw = self._win_start = now
        self.window_loss.reset()
        self._win_images, self._win_data = 0, 0.0

    def summary(self) -> dict:
        """The epoch so far; img_per_s counts all processes' images."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": self.epoch_loss.value(), "lr": self.lr, "steps": self.step - self.start_step,
                "time_s": elapsed, "img_per_s": self.world_size * self.images / elapsed,
                "data_frac": min(self.data_time / elapsed, 1.0)}

    def close(self) -> dict:
        s = self.summary()
        if self.enabled:
            if self.is_tty and self._drawn:
                self.stream.write("\n")
            head = "done" if self.step >= self.total else f"stopped at step {self.step} of {self.total}"
            replay = f", its data replayed in {elapsed_text(self.replay_s)}" if self.replayed else ""
            resumed = f" (resumed at step {self.start_step} of {self.total}{replay})" if self.start_step else ""
            steps = f"{s['steps']} step{'s' if s['steps'] != 1 else ''}"
            line = f"epoch {self.epoch}/{self.epochs} {head}: {steps}{resumed} in {elapsed_text(s['time_s'])}"
            if self.epoch_loss.count:
                line += f" loss {s['loss']:.4f}"
            if self.images:
                line += " " + self.rate_text(self.images, s["time_s"])
            line += f" data {100 * s['data_frac']:.0f}%"
            run_left = self.steps_left()[1] if self.step >= self.total else 0
            if run_left and s["steps"]:
                line += f" run eta {duration_text(run_left * s['time_s'] / s['steps'] + self.run_extra_s)}"
            self.stream.write(line + "\n")
            self.stream.flush()
        return s


def elapsed_text(seconds: float) -> str:
    """A time taken: `8.6s` under a minute, else as `duration_text` (`1:30:05` reads better than
    `5405.0s` on a long epoch)."""
    return f"{seconds:.1f}s" if seconds < 59.95 else duration_text(seconds)


def duration_text(seconds: float) -> str:
    """Seconds as `M:SS`, or `H:MM:SS` from an hour (hours keep counting past a day)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def terminal_width() -> int:
    """Columns a redrawn line may use: the terminal's less one (some terminals wrap a line that
    fills the last column, which breaks the next '\\r')."""
    return max(20, shutil.get_terminal_size().columns - 1)


def fit_fields(parts: list[tuple[str, int]], width: int) -> str:
    """The fields joined by spaces, leaving out the highest-ranked ones until the line fits
    `width`; cut at `width` if even the rank-0 fields do not fit."""
    for rank in sorted({r for _, r in parts}, reverse=True):
        line = " ".join(text for text, _ in parts)
        if len(line) <= width or rank == 0:
            break
        parts = [(text, r) for text, r in parts if r != rank]
    line = " ".join(text for text, _ in parts)
    return line[:width]
