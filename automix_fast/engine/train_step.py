"""What one optimizer step uses: the run's step context, autocast, the non-finite guard and the
(possibly skipped) update. Nothing here waits on the device: the non-finite check writes a
device flag that the fused optimizer reads to skip its update."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

@dataclass
class StepGuard:
    """Device-side bookkeeping of skipped (non-finite) steps."""

    device: torch.device
    found_inf: torch.Tensor = None
    skipped: torch.Tensor = None
    consecutive: torch.Tensor = None
    worst: torch.Tensor = None  # the longest run of consecutive bad steps since the last check

    def __post_init__(self):
        self.found_inf = torch.zeros(1, device=self.device)
        self.skipped = torch.zeros(1, device=self.device)
        self.consecutive = torch.zeros(1, device=self.device)
        self.worst = torch.zeros(1, device=self.device)
        self._one = torch.ones(1, device=self.device)

    def check(self, params: list[torch.Tensor], bad_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Set found_inf to 1 when any gradient is NaN/inf or bad_loss (a 0/1 flag) is set (no sync)."""
        self.found_inf.zero_()
        tensors = [p.grad for p in params if p.grad is not None]
        if tensors:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, self.found_inf, self._one)
        if bad_loss is not None:
            torch.maximum(self.found_inf, (bad_loss > 0).float(), out=self.found_inf)
        return self.found_inf

    def record(self, found_inf: torch.Tensor) -> None:
        bad = (found_inf > 0).float()
        self.skipped += bad
        self.consecutive.mul_(bad).add_(bad)  # reset on a good step, count up on a bad one
        torch.maximum(self.worst, self.consecutive, out=self.worst)

    def too_many_bad(self, max_bad_steps: int) -> int:
        """The longest bad run since the last call when it reached max_bad_steps, else 0 (one sync)."""
        worst = int(self.worst.item())
        self.worst.copy_(self.consecutive)
        return worst if worst >= max_bad_steps else 0


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def nonfinite_flag(loss: torch.Tensor) -> torch.Tensor:
    """(1,) float32 on the loss's device: 1 when the loss is NaN/inf (no sync)."""
    return (~torch.isfinite(loss.detach().float())).float().reshape(1)


def optimizer_step(optimizer, params, guard: StepGuard, scaler=None, bad_loss: torch.Tensor | None = None,
                   clip: Callable[[list[torch.Tensor]], None] | None = None) -> torch.Tensor:
    """One update, skipped when a gradient is not finite or bad_loss (see nonfinite_flag) is set;
    returns the device flag, which says exactly whether the update was skipped. `clip(params)`
    (engine/grad_clip.py) runs on the unscaled gradients just before the update.

    Under torchrun bad_loss must be the same on every rank (EagerStep.update all-reduces it with
    the gradients), so that every rank skips, or applies, the same steps."""
    if scaler is not None:
        scaler.unscale_(optimizer)
        if clip is not None:
            clip(params)
        found_per_device = scaler._found_inf_per_device(optimizer)
        if bad_loss is not None and found_per_device:
            # A non-finite loss with finite (e.g. zero) gradients is still a bad step: make
            # GradScaler skip it (and back off its scale) rather than apply it and count a skip.
            first = next(iter(found_per_device.values()))  # a 0-dim float32 per device
            first.add_(bad_loss.to(first.device, first.dtype).sum())
        found = (sum(v.float() for v in found_per_device.values()).reshape(1) > 0).float()
        scaler.step(optimizer)  # GradScaler skips on overflow and lowers the scale
        scaler.update()
        return found
    if clip is not None:
        clip(params)
    found = guard.check(params, bad_loss)
    if optimizer.defaults.get("fused"):
        # The fused kernel skips the whole update on the device. 0-d, as GradScaler passes it: fused
        # Adam subtracts it from its 0-d step counts, which a (1,) flag cannot broadcast into.
        optimizer.found_inf = found.reshape(())
        optimizer.step()
    elif found.item() == 0:  # unfused optimizers cannot skip on the device
        optimizer.step()
    return found


@dataclass
class StepContext:
    """What every optimizer step of a run uses, the same in every epoch.

    A step is `accum_steps` micro-batches (timm's --grad-accum-steps): each backward adds
    loss / accum_steps to the gradients, gradients are all-reduced (grad_sync) once, after the
    last one, and the epoch's last step takes the micro-batches left (timm's rule), so an epoch
    is ceil(len(loader) / accum_steps) steps. Steps, schedules, lambdas and the after_step
    updates (EMA, momentum encoder) count optimizer steps. `clip` (grad_clip.py) runs before
    each update. world_size: the processes training together; the logged `img_per_s_global` is
    world_size x this rank's images per second (every rank runs the same number of equal
    batches). metric_mean (under torchrun) averages the logged values over ranks in place, one
    collective per log interval, so the metrics describe the global batch (every rank must log
    together). max_bad_steps consecutive skipped steps raise NonFiniteError.
    """

    mixer: Any
    optimizer: torch.optim.Optimizer
    schedule: Any
    guard: StepGuard
    total_steps: int
    amp_dtype: torch.dtype | None = None
    scaler: Any = None
    grad_sync: Callable[[list[torch.Tensor]], None] | None = None
    metric_mean: Callable[[list[torch.Tensor]], None] | None = None
    accum_steps: int = 1
    clip: Callable[[list[torch.Tensor]], None] | None = None
    max_bad_steps: int = 20
    world_size: int = 1
    stepper: Any = None  # what runs each step (static_step.StaticStep); None: a fresh EagerStep each epoch

    @property
    def device(self) -> torch.device:
        return self.guard.device
