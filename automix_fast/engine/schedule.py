"""Learning-rate schedules as pure functions of the global step.

No scheduler object carries state across steps, so a resumed run only needs its step count:
`schedule.apply(optimizer, step)` before each optimizer step gives the same LRs as an
uninterrupted run. Every schedule has one base LR per parameter group (the Mix Block can have
its own LR and floor) and an optional linear warmup.

Against timm's schedulers (timm's train.py defaults): the warmup moves every step, where timm's
moves once per epoch unless --sched-on-updates. The cosine starts at the end of the warmup and
spans the rest of the run, which is timm's non-default --warmup-prefix; timm's default runs the
cosine over the whole run from step 0 and lets the warmup replace its first values, so after
the warmup its LR is lower than ours (at the end of a 1-epoch warmup of a 10-epoch run, per
step: 0.0976 of a 0.1 peak where ours is 0.1). Per epoch (without --sched-on-updates, as mmcv's
by-epoch cosine of the official recipes) the cosine holds its value at the epoch's first step.
step and multistep count epochs from the run's start, as timm's default.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from automix_fast.config.sections import MASK_LOSS_ANNEALS, SCHEDULES
from automix_fast.errors import ConfigError


def cosine_anneal(start: float, end: float, step: float, total: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step >= total), clamped outside [0, total].

    Used for the mask-loss weight (0.1 -> 0) and, as `cosine_anneal(base, end, t, T)`, for the
    momentum encoder's rise from `base` to `end` over the T steps of the run:
    `end - (end - base) (cos(pi t / T) + 1) / 2` is the same formula.
    """
    t = 1.0 if total <= 0 else min(max(step / total, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0


def momentum_cosine_start(total_steps: int) -> int:
    """The first step of the momentum encoder's cosine rise: `int(0.1 T)`, the integer step the
    official hook computes (`adjust_scope=[0.1, 1.0]`), not the real number 0.1 T."""
    return int(total_steps * 0.1)


class CompoundCosine:
    """The official mask-loss anneal: each step's weight is the cosine factor applied to the
    previous step's weight, w_t = w_{t-1} (1 + cos(pi t / T)) / 2 (the OpenMixup hook passes the
    current value as its base every iteration), so w_t = w_0 prod_{i<=t} (1 + cos(pi i / T)) / 2.

    A pure function of the step (resume needs nothing stored); consecutive steps extend a cached
    product, any other step recomputes it (O(t) once, a fraction of a second at ImageNet scale).
    """

    def __init__(self, weight: float, total_steps: int):
        self.weight, self.total = float(weight), int(total_steps)
        self._step, self._value = -1, self.weight

    def __call__(self, step: int) -> float:
        if self.total <= 0:
            return self.weight
        if step < self._step:
            self._step, self._value = -1, self.weight
        for i in range(self._step + 1, step + 1):
            self._value *= (1.0 + math.cos(math.pi * min(i / self.total, 1.0))) / 2.0
        self._step = max(self._step, step)
        return self._value


DEFAULT_WARMUP_EPOCHS = 1.0
WARMUP_CAP = 0.25  # the default warm-up is at most this share of the run


def resolve_warmup_epochs(asked: float | None, epochs: int) -> tuple[float, str | None]:
    """(warm-up epochs to run, a line to print or None) for --warmup-epochs `asked` (None: the default).

    The default is 1 epoch, at most a quarter of the run (`--epochs 2`: half an epoch), so a
    short run's last epochs still decay from the peak LR. A value given (flag or config file) is
    kept; past a quarter of the run it comes with a warning line.
    """
    cap = WARMUP_CAP * epochs
    if asked is None:
        if DEFAULT_WARMUP_EPOCHS <= cap:
            return DEFAULT_WARMUP_EPOCHS, None
        return cap, (f"warm-up: {cap:g} epochs (the default {DEFAULT_WARMUP_EPOCHS:g}, capped at a quarter of "
                     f"the {epochs}-epoch run; --warmup-epochs sets it)")
    if asked > cap:
        return asked, (f"warning: --warmup-epochs {asked:g} is more than a quarter of the {epochs}-epoch run; "
                       f"kept as given (the default would be capped at {cap:g})")
    return asked, None


def _per_group(value, n: int, name: str) -> list[float]:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} parameter groups")
    return values


class LRSchedule:
    """Linear warmup from a start LR to each group's base LR, then `_decayed(step)`.

    The start LR is `warmup_lr` when given (timm's absolute --warmup-lr), else
    `base * warmup_start_factor`.
    """

    def __init__(self, base_lrs: Sequence[float] | float, *, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.0, warmup_lr: float | None = None):
        self.base_lrs = ([float(base_lrs)] if isinstance(base_lrs, (int, float))
                         else [float(b) for b in base_lrs])
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = ([float(warmup_lr)] * len(self.base_lrs) if warmup_lr is not None
                             else [b * warmup_start_factor for b in self.base_lrs])

    def _decayed(self, step: int) -> list[float]:
        raise NotImplementedError

    def lr_at(self, step: int) -> list[float]:
        """The LR of every parameter group for global step `step` (0-based)."""
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return [s + (b - s) * frac for s, b in zip(self.warmup_start, self.base_lrs)]
        return self._decayed(step)

    def apply(self, optimizer, step: int) -> list[float]:
        """Set each param group's lr for `step` (a tensor lr is filled in place); returns the LRs
        as host floats (for logging)."""
        lrs = self.lr_at(step)
        if len(optimizer.param_groups) != len(lrs):
            raise ValueError(f"schedule has {len(lrs)} groups, optimizer has {len(optimizer.param_groups)}")
        for group, lr in zip(optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):  # the static step's: refilled in place, read by its graphs
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lrs


class CosineSchedule(LRSchedule):
    """After warmup: `floor + (base - floor) * (1 + cos(pi * t)) / 2`, t from 0 at the end of
    warmup to 1 at `total_steps`, and the floor after that."""

    def __init__(self, total_steps: int, base_lrs: Sequence[float] | float, *,
                 floors: Sequence[float] | float = 0.0, steps_per_epoch: int | None = None, **warmup):
        super().__init__(base_lrs, **warmup)
        self.total_steps = int(total_steps)
        self.floors = _per_group(floors, len(self.base_lrs), "floors")
        # Per epoch (mmcv's by_epoch cosine of the official recipes; without --sched-on-updates):
        # the decay holds the value of the epoch's first step for the whole epoch.
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None

    def _decayed(self, step: int) -> list[float]:
        if self.steps_per_epoch:
            step = step - step % self.steps_per_epoch
        span = self.total_steps - self.warmup_steps
        return [cosine_anneal(b, f, step - self.warmup_steps, span)
                for b, f in zip(self.base_lrs, self.floors)]


class StepSchedule(LRSchedule):
    """timm's StepLRScheduler: after warmup, base * rate ** floor(t / decay_epochs), t the epoch
    (per step with `steps_per_epoch` None: the step in epochs, timm's --sched-on-updates),
    counted from the run's start (timm without --warmup-prefix)."""

    def __init__(self, decay_epochs: float, steps_per_epoch: int, base_lrs: Sequence[float] | float, *,
                 rate: float = 0.1, on_updates: bool = False, **warmup):
        super().__init__(base_lrs, **warmup)
        self.decay_epochs, self.steps_per_epoch = float(decay_epochs), int(steps_per_epoch)
        self.rate, self.on_updates = float(rate), on_updates

    def _decayed(self, step: int) -> list[float]:
        if self.on_updates:  # timm's arithmetic: t // decay_t, both in updates
            k = step // (self.decay_epochs * self.steps_per_epoch)
        else:
            k = (step // self.steps_per_epoch) // self.decay_epochs
        return [b * self.rate**k for b in self.base_lrs]


class MultiStepSchedule(LRSchedule):
    """timm's MultiStepLRScheduler: after warmup, base * rate ** (number of milestones <= step);
    milestones in steps (an epoch's first step, so per epoch and per step agree)."""

    def __init__(self, milestones: Sequence[int], base_lrs: Sequence[float] | float, *,
                 rate: float = 0.1, **warmup):
        super().__init__(base_lrs, **warmup)
        self.milestones = sorted(int(m) for m in milestones)
        self.rate = float(rate)

    def _decayed(self, step: int) -> list[float]:
        k = sum(step >= m for m in self.milestones)
        return [b * self.rate**k for b in self.base_lrs]


class ConstSchedule(LRSchedule):
    """After warmup: the base LR."""

    def _decayed(self, step: int) -> list[float]:
        return list(self.base_lrs)


def build_schedule(name: str, base_lrs: Sequence[float] | float, *, total_steps: int,
                   steps_per_epoch: int, warmup_steps: int = 0, floors=0.0,
                   decay_epochs: float | None = None, decay_milestones: Sequence[int] = (), decay_rate: float = 0.1,
                   warmup_start_factor: float = 0.0, warmup_lr: float | None = None,
                   on_updates: bool = True) -> LRSchedule:
    """`--sched cosine|step|multistep|const`, as timm's: `decay_epochs` the period of step (timm's
    --decay-epochs), `decay_milestones` the epochs of multistep (timm's --decay-milestones),
    `decay_rate` the factor of each decay. `on_updates` (timm's --sched-on-updates): the cosine
    and step move every step; off, once per epoch (the warmup moves every step either way)."""
    warmup = dict(warmup_steps=warmup_steps, warmup_start_factor=warmup_start_factor,
                  warmup_lr=warmup_lr)
    if name == "cosine":
        return CosineSchedule(total_steps, base_lrs, floors=floors,
                              steps_per_epoch=None if on_updates else steps_per_epoch, **warmup)
    if name == "step":
        return StepSchedule(decay_epochs, steps_per_epoch, base_lrs, rate=decay_rate, on_updates=on_updates, **warmup)
    if name == "multistep":
        return MultiStepSchedule([e * steps_per_epoch for e in decay_milestones], base_lrs, rate=decay_rate, **warmup)
    if name == "const":
        return ConstSchedule(base_lrs, **warmup)
    raise ConfigError(f"unknown sched '{name}'; choose from: {', '.join(SCHEDULES)}")
