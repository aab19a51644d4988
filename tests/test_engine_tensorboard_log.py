"""engine/tensorboard_log.py: --log-tensorboard writes event files, and says in one line when the
package is missing."""
from __future__ import annotations

import numpy as np
import pytest

from automix_fast.errors import ConfigError


def test_tensorboard_missing_is_one_line(monkeypatch, tmp_path):
    from automix_fast.engine import tensorboard_log
    from automix_fast.engine.metrics import MetricLogger

    monkeypatch.setattr(tensorboard_log, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        MetricLogger(tmp_path, tensorboard=True)


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from automix_fast.engine.metrics import MetricLogger

    logger = MetricLogger(tmp_path, tensorboard=True)
    for step, loss in enumerate(np.linspace(2.0, 1.0, 3)):
        logger.log("train", {"loss": loss, "skipped_steps": 0}, epoch=1, step=step)
    logger.log("eval", {"one_top1": 50.0, "count": 21}, epoch=1, step=3)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([2.0, 1.5, 1.0])
    assert [e.step for e in acc.Scalars("eval/one_top1")] == [3]
