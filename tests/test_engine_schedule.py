import math

import pytest
import torch

from automix_fast.engine.schedule import (ConstSchedule, CosineSchedule, MultiStepSchedule, StepSchedule,
                                          build_schedule, cosine_anneal, resolve_warmup_epochs)
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


def test_multistep_const_and_apply():
    s = build_schedule("multistep", [0.1, 0.01], total_steps=100, steps_per_epoch=10, decay_milestones=[3, 6])
    assert s.lr_at(29) == pytest.approx([0.1, 0.01])
    assert s.lr_at(30) == pytest.approx([0.01, 0.001])
    assert s.lr_at(99) == pytest.approx([0.001, 0.0001])
    assert isinstance(s, MultiStepSchedule)
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


def _timm_step(t: float, decay_t: float, rate: float, warmup_t: float, base: float, warmup_lr: float) -> float:
    """timm's StepLRScheduler._get_lr (warmup_prefix False, its default in train.py)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    return base * rate ** (t // decay_t)


def _timm_multistep(t: float, milestones, rate: float, base: float) -> float:
    """timm's MultiStepLRScheduler._get_lr without warmup: bisect_right of t in the milestones."""
    import bisect

    return base * rate ** bisect.bisect_right(milestones, t)


@pytest.mark.parametrize("on_updates", [False, True])
def test_step_and_multistep_are_timms(on_updates):
    """--sched step decays by --decay-rate every --decay-epochs epochs (a period, fractions
    allowed), --sched multistep at each of --decay-milestones, as timm's schedulers stepped per
    epoch (t the epoch) or per update with --sched-on-updates (t the update, the epochs scaled by
    the updates per epoch); after the warmup, which is per step here."""
    spe, base = 8, 0.2
    step = build_schedule("step", [base], total_steps=12 * spe, steps_per_epoch=spe, decay_epochs=2.5,
                          decay_rate=0.5, warmup_steps=spe, warmup_lr=1e-5, on_updates=on_updates)
    multi = build_schedule("multistep", [base], total_steps=12 * spe, steps_per_epoch=spe, decay_milestones=[7, 2, 4],
                           decay_rate=0.3, on_updates=on_updates)
    assert isinstance(step, StepSchedule) and isinstance(multi, MultiStepSchedule)
    for i in range(spe, 12 * spe):
        t, scale = (i, spe) if on_updates else (i // spe, 1)  # scale: updates per unit of t
        assert step.lr_at(i)[0] == pytest.approx(_timm_step(t, 2.5 * scale, 0.5, scale, base, 1e-5)), i
        assert multi.lr_at(i)[0] == pytest.approx(_timm_multistep(t, [2 * scale, 4 * scale, 7 * scale], 0.3, base)), i
    # Per epoch the step decays at epoch 3 (3 // 2.5 = 1); per update halfway through it (step 20).
    assert step.lr_at(20)[0] == pytest.approx(0.1 if on_updates else 0.2)
    assert step.lr_at(24)[0] == pytest.approx(0.1) and step.lr_at(40)[0] == pytest.approx(0.05)


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
