"""Metrics: top-k counts, running means, the JSON-lines log and the console progress line.

Nothing here reads a device tensor per step: `.item()` on a CUDA tensor waits for the GPU
and stalls the pipeline, so values stay on the device and are read only when a line is
printed or written (a few times per second at most).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


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
            from automix_fast.engine.tensorboard_log import TensorBoardWriter

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
            from automix_fast.rundir import write_failure

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

        epoch 3/100 [######--------------] 150/500 loss 2.345 lr 0.1 img/s 2450 data 3%

    On a TTY the line is redrawn in place with '\\r' at most every `min_interval` seconds; off a
    TTY (CI, pipes, log files) a plain line is printed every `log_interval` steps instead. The
    loss shown is the mean since the previous line; img/s and data% cover the same window.
    `close()` prints the epoch summary and returns it as a dict for the metric log: the steps
    that ran in this process (a resumed epoch starts at `start_step`; img/s covers what ran),
    and for an epoch that ended early, where it stopped.
    With `enabled=False` (ranks other than 0) nothing is printed.
    """

    BAR = 20

    def __init__(self, epoch: int, epochs: int, total_steps: int, *, log_interval: int = 50,
                 stream=None, is_tty: bool | None = None, enabled: bool = True, min_interval: float = 0.2,
                 start_step: int = 0):
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.log_interval = max(1, int(log_interval))
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None and hasattr(self.stream, "isatty") else bool(is_tty)
        self.enabled = enabled
        self.min_interval = min_interval
        self.step = self.start_step = start_step
        self.lr = None
        self.epoch_loss, self.window_loss = Mean(), Mean()
        self.start = self._win_start = time.perf_counter()
        self._last_draw = float("-inf")  # the first step always draws
        self.images = self._win_images = 0
        self.data_time = self._win_data = 0.0
        self._drawn = 0  # length of the line currently on screen (TTY), to blank leftovers
        self._shown_loss = None
        self._note = ""

    def update(self, *, loss=None, lr: float | None = None, images: int = 0, data_time: float = 0.0,
               note: str | None = None) -> None:
        """Record one finished step. `loss` may be a device tensor (read only when drawn),
        `images` the samples in the step, `data_time` host seconds spent waiting for the batch,
        `note` text shown at the end of the line until the next note (AutoMix's mask statistics)."""
        self.step += 1
        if note is not None:
            self._note = note
        if loss is not None:
            self.epoch_loss.add(loss)
            self.window_loss.add(loss)
        if lr is not None:
            self.lr = lr
        self.images += images
        self._win_images += images
        self.data_time += data_time
        self._win_data += data_time
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.is_tty:
            if now - self._last_draw >= self.min_interval or self.step == self.total:
                self._emit(self._line(now), now)
        elif self.step % self.log_interval == 0:
            self._emit(self._line(now), now)

    def _line(self, now: float) -> str:
        filled = int(self.BAR * min(self.step / max(self.total, 1), 1.0))
        width = len(str(self.total))
        parts = [f"epoch {self.epoch}/{self.epochs}", f"[{'#' * filled}{'-' * (self.BAR - filled)}]",
                 f"{self.step:>{width}}/{self.total}"]
        if self.window_loss.count:
            self._shown_loss = self.window_loss.value()
        if self._shown_loss is not None:  # the newest loss read, until a newer one arrives
            parts.append(f"loss {self._shown_loss:.3f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        elapsed = max(now - self._win_start, 1e-9)
        if self._win_images:
            parts.append(f"img/s {self._win_images / elapsed:.0f}")
        parts.append(f"data {100 * min(self._win_data / elapsed, 1.0):.0f}%")
        if self._note:
            parts.append(self._note)
        return " ".join(parts)

    def _emit(self, line: str, now: float) -> None:
        if self.is_tty:
            self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
            self._drawn = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_draw = self._win_start = now
        self.window_loss.reset()
        self._win_images, self._win_data = 0, 0.0

    def summary(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": self.epoch_loss.value(), "lr": self.lr, "steps": self.step - self.start_step,
                "time_s": elapsed, "img_per_s": self.images / elapsed,
                "data_frac": min(self.data_time / elapsed, 1.0)}

    def close(self) -> dict:
        s = self.summary()
        if self.enabled:
            if self.is_tty and self._drawn:
                self.stream.write("\n")
            head = "done" if self.step >= self.total else f"stopped at step {self.step} of {self.total}"
            resumed = f" (resumed at step {self.start_step} of {self.total})" if self.start_step else ""
            line = f"epoch {self.epoch}/{self.epochs} {head}: {s['steps']} steps{resumed} in {s['time_s']:.1f}s"
            if self.epoch_loss.count:
                line += f" loss {s['loss']:.4f}"
            if self.images:
                line += f" img/s {s['img_per_s']:.0f}"
            line += f" data {100 * s['data_frac']:.0f}%"
            self.stream.write(line + "\n")
            self.stream.flush()
        return s
