"""`--log-tensorboard`: the scalars of metrics.jsonl also as TensorBoard event files.

Written to RUN/tensorboard/ under the tags `<kind>/<name>` (train/loss, eval/one_top1, ...)
at the global optimizer step. Needs the `tensorboard` package (torch.utils.tensorboard
imports it); asking for it without the package is a one-line error before training starts.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from automix_fast.errors import ConfigError


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """The one-line ConfigError for --log-tensorboard without the package (the trainer calls
    this before it creates the run folder)."""
    if not tensorboard_available():
        raise ConfigError("--log-tensorboard needs the tensorboard package, which is not installed "
                          "(pip install tensorboard)")


class TensorBoardWriter:
    def __init__(self, run_dir: str | os.PathLike):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, kind: str, values: dict, step: int | None) -> None:
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue  # counts of images and text stay in metrics.jsonl
            self._writer.add_scalar(f"{kind}/{name}", v, global_step=step)

    def close(self) -> None:
        self._writer.close()
