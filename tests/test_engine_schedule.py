import math

import pytest
import torch

from automix_fast.engine.schedule import (ConstSchedule, CosineSchedule, StepSchedule, build_schedule,
                                          cosine_anneal, resolve_warmup_epochs)
from automix_fast.errors import ConfigError


def test_cosine_warmup_and_floors():
    # Two groups: backbone (0.1 -> 0.05 floor) and Mix Block (0.2 -> 1e-3 floor).
    s = CosineSchedule(110, [0.1, 0.2], floors=[0.05, 1e-3], warmup_steps=10, warmup_start_factor=0.0)
    assert s.lr_at(0) == [0.0, 0.0]
    assert s.lr_at(5) == pytest.approx([0.05, 0.1])
    assert s.lr_at(10) == pytest.approx([0.1, 0.2])  # end of warmup: the base LRs
    assert s.lr_at(60) == pytest.approx([0.075, (0.2 + 1e-3) / 2])  # halfway through the cosine
    t = 0.3
    expect = [f + (b - f) * (1 + math.cos(math.pi * t)) / 2 for b, f in [(0.1, 0.05), (0.2, 1e-3)]]
    assert s.lr_at(40) == pytest.approx(expect)
    assert s.lr_at(110) == pytest.approx([0.05, 1e-3])
    assert s.lr_at(10_000) == pytest.approx([0.05, 1e-3])  # clamped after total_steps


def test_warmup_lr_absolute_and_no_warmup():
    s = CosineSchedule(100, [0.1], warmup_steps=4, warmup_lr=1e-5)
    assert s.lr_at(0) == [1e-5]
    assert s.lr_at(2) == pytest.approx([(1e-5 + 0.1) / 2])
    s = CosineSchedule(100, 0.1)
    assert s.lr_at(0) == [0.1] and s.lr_at(100) == [0.0]


def test_step_const_and_apply():
    s = build_schedule("step", [0.1, 0.01], total_steps=100, steps_per_epoch=10, decay_milestones=[3, 6])
    assert s.lr_at(29) == pytest.approx([0.1, 0.01])
    assert s.lr_at(30) == pytest.approx([0.01, 0.001])
    assert s.lr_at(99) == pytest.approx([0.001, 0.0001])
    assert isinstance(s, StepSchedule)
    c = build_schedule("const", 0.1, total_steps=100, steps_per_epoch=10, warmup_steps=2)
    assert isinstance(c, ConstSchedule) and c.lr_at(1) == [0.05] and c.lr_at(50) == [0.1]

    w = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b]}], lr=1.0)
    lrs = CosineSchedule(10, [0.1, 0.2]).apply(opt, 10)
    assert [g["lr"] for g in opt.param_groups] == lrs == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups"):
        CosineSchedule(10, [0.1]).apply(opt, 0)
    with pytest.raises(ConfigError, match="unknown sched 'poly'"):
        build_schedule("poly", 0.1, total_steps=1, steps_per_epoch=1)


def test_cosine_anneal():
    assert cosine_anneal(0.1, 0.0, 0, 100) == pytest.approx(0.1)
    assert cosine_anneal(0.1, 0.0, 50, 100) == pytest.approx(0.05)
    assert cosine_anneal(0.1, 0.0, 100, 100) == pytest.approx(0.0)
    assert cosine_anneal(0.1, 0.0, 500, 100) == pytest.approx(0.0)
    assert cosine_anneal(0.999, 0.999999, 0, 0) == 0.999999


def test_default_warmup_is_at_most_a_quarter_of_the_run():
    assert resolve_warmup_epochs(None, 15) == (1.0, None)
    assert resolve_warmup_epochs(None, 4) == (1.0, None)
    value, line = resolve_warmup_epochs(None, 2)
    assert value == 0.5 and line.startswith("warm-up: 0.5 epochs (the default 1, capped")
    assert resolve_warmup_epochs(None, 1)[0] == 0.25
    # A value given is kept: quietly within the quarter, with a warning past it.
    assert resolve_warmup_epochs(0.0, 2) == (0.0, None) and resolve_warmup_epochs(2.0, 8) == (2.0, None)
    value, line = resolve_warmup_epochs(1.0, 2)
    assert value == 1.0 and line.startswith("warning: --warmup-epochs 1 is more than a quarter of the 2-epoch run")
    # With the capped default, a 2-epoch per-epoch cosine's last epoch is below the peak.
    steps = 10
    sched = build_schedule("cosine", 0.1, total_steps=2 * steps, steps_per_epoch=steps,
                           warmup_steps=int(resolve_warmup_epochs(None, 2)[0] * steps), on_updates=False)
    assert sched.lr_at(steps)[0] < 0.1 and sched.lr_at(steps - 1)[0] == pytest.approx(0.1)
