"""The training and evaluation loops, with explicit arguments (objects, no argument namespace).

Inside a step nothing waits on the device: lambdas are host floats, the non-finite check
writes a device flag that the fused optimizer reads to skip its update, and running sums
stay on the device until a log interval reads them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from automix_fast.engine.metrics import accuracy_topk
from automix_fast.errors import CheckpointError, UserError


class NonFiniteError(UserError):
    """Too many consecutive steps had a non-finite loss or gradient."""


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

    Under torchrun bad_loss must be the same on every rank (train_one_epoch all-reduces it with
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
        optimizer.found_inf = found  # the fused kernel skips the whole update on the device
        optimizer.step()
    elif found.item() == 0:  # unfused optimizers cannot skip on the device
        optimizer.step()
    return found


@dataclass
class EpochResult:
    steps: int = 0  # steps run in this call
    stopped: bool = False  # a stop was requested before the epoch ended
    means: dict = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0


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
    together). More than max_bad_steps consecutive skipped steps raise NonFiniteError.
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

    @property
    def device(self) -> torch.device:
        return self.guard.device


@dataclass
class EpochPlan:
    """Which epoch to run: `epoch` (0-based), `start_step` the global step of its first step,
    `skip` the optimizer steps already run (a resumed epoch)."""

    epoch: int
    start_step: int
    skip: int = 0


@dataclass
class EpochCallbacks:
    """What the loop reports to, and asks, while it runs.

    on_log(i, values) receives host floats every log_interval steps and at the end;
    progress.update(...) (see metrics.ProgressLine) is called every step, with the loss only at
    those intervals, so drawing the bar never waits on the device. Under torchrun should_stop
    is this rank's own flag; the ranks agree on it at log steps only, inside the metric_mean
    collective, so a step makes no extra collective and no host sync.
    """

    log_interval: int = 50
    on_log: Callable[[int, dict], None] | None = None
    progress: Any = None
    should_stop: Callable[[], bool] | None = None


def train_one_epoch(ctx: StepContext, loader, plan: EpochPlan, callbacks: EpochCallbacks | None = None) -> EpochResult:
    """Train over one epoch of `loader` as `plan` says (see StepContext for what a step is)."""
    run = _EpochRun(ctx, loader, plan, callbacks or EpochCallbacks())
    for i in range(plan.skip, run.batches):
        if run.step(i):
            run.result.stopped = True
            break
    return run.finish()


class _EpochRun:
    """One call of train_one_epoch: the data iterator and the running sums between log reads."""

    def __init__(self, ctx: StepContext, loader, plan: EpochPlan, callbacks: EpochCallbacks):
        self.ctx, self.plan, self.cb = ctx, plan, callbacks
        ctx.mixer.train()
        loader.set_epoch(plan.epoch)
        self.params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        self.micro_batches = len(loader)
        self.batches = steps_per_epoch(self.micro_batches, ctx.accum_steps)  # optimizer steps
        self.result = EpochResult()
        self.sums: dict[str, torch.Tensor] = {}
        self.count_since_log = 0  # micro-batches
        self.epoch_loss, self.epoch_count = 0.0, 0  # host floats from the interval reads: the epoch's mean loss
        self.it = iter(loader)
        if plan.skip >= self.batches:
            raise CheckpointError(
                f"the checkpoint stopped after batch {plan.skip} of epoch {plan.epoch + 1}, but an epoch now has "
                f"only {self.batches} batches (batch size or process count changed?); resume from an epoch checkpoint"
            )
        for _ in range(plan.skip * ctx.accum_steps):  # replay the data order of an interrupted epoch
            next(self.it)
        self.t_start = time.perf_counter()

    def step(self, i: int) -> bool:
        """Optimizer step i of the epoch; True when the loop should stop after it."""
        ctx, cb = self.ctx, self.cb
        step = self.plan.start_step + i
        ctx.schedule.apply(ctx.optimizer, step)
        ctx.optimizer.zero_grad(set_to_none=True)
        data_time, step_images, loss_sum = self._accumulate(i, step)
        self.result.data_seconds += data_time
        self._update(step, loss_sum)
        self.result.steps += 1
        self.result.images += step_images
        last = i == self.batches - 1
        if ctx.metric_mean is None:
            stop = cb.should_stop is not None and cb.should_stop()
            logging_now = (i + 1) % cb.log_interval == 0 or last or stop
        else:  # torchrun: ranks agree on a stop request at log steps, in the log's own collective
            stop = False
            logging_now = (i + 1) % cb.log_interval == 0 or last
        if cb.progress is not None and not logging_now:  # the bar moves; the loss waits for the interval's read
            cb.progress.update(lr=ctx.optimizer.param_groups[0]["lr"], images=step_images, data_time=data_time)
        if logging_now:
            stop = self._log(i, step, step_images, data_time) or stop
        return stop

    def _accumulate(self, i: int, step: int) -> tuple[float, int, torch.Tensor]:
        """Forward and backward over step i's micro-batches: (data seconds, images, summed loss)."""
        ctx = self.ctx
        micro = min(ctx.accum_steps, self.micro_batches - i * ctx.accum_steps)
        data_time, step_images, loss_sum = 0.0, 0, None
        for _ in range(micro):
            t0 = time.perf_counter()
            x, y = next(self.it)
            data_time += time.perf_counter() - t0
            with autocast(ctx.device, ctx.amp_dtype):
                loss, logs = ctx.mixer.loss(x, y, step, ctx.total_steps)
            part = loss / micro if micro > 1 else loss
            (ctx.scaler.scale(part) if ctx.scaler is not None else part).backward()
            loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
            for k, v in logs.items():
                v = v.detach().float().to(ctx.device)
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.count_since_log += 1
            step_images += x.shape[0]
        return data_time, step_images, loss_sum

    def _update(self, step: int, loss_sum: torch.Tensor) -> None:
        """All-reduce the gradients (torchrun), then the (possibly skipped) update and after_step."""
        ctx = self.ctx
        bad_loss = nonfinite_flag(loss_sum)
        if ctx.grad_sync is not None:  # once per step: no all-reduce for the first micro-batches
            for p in self.params:  # every rank must all-reduce the same list of tensors
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            # Mean over ranks; a NaN on one rank reaches all. The loss flag rides along, so a
            # non-finite loss on any rank skips the step on every rank and is counted the same.
            ctx.grad_sync([p.grad for p in self.params] + [bad_loss])
        found = optimizer_step(ctx.optimizer, self.params, ctx.guard, ctx.scaler, bad_loss, ctx.clip)
        ctx.guard.record(found)
        ctx.mixer.after_step(step, ctx.total_steps)

    def _log(self, i: int, step: int, step_images: int, data_time: float) -> bool:
        """The interval's one device read: report it; True when some rank asked to stop."""
        ctx, cb, mixer = self.ctx, self.cb, self.ctx.mixer
        values, stop = self._read_interval()
        if cb.progress is not None:
            note = mixer.progress_text(values)  # AutoMix: mask stats
            cb.progress.update(loss=values["loss"], lr=values["lr"], images=step_images, data_time=data_time, note=note,
                               values=values)
        if cb.on_log is not None:
            cb.on_log(i + 1, values)
        worst = ctx.guard.too_many_bad(ctx.max_bad_steps)  # read once per interval, not per step
        if worst:
            raise NonFiniteError(
                f"{worst} consecutive steps had a non-finite loss or gradients (max_bad_steps "
                f"{ctx.max_bad_steps}; epoch {self.plan.epoch + 1}, step {step + 1}); stopping without saving the current state"
            )
        return stop

    def _read_interval(self) -> tuple[dict, bool]:
        """The logged values since the last read (means over ranks under torchrun), and whether a
        stop was requested (by any rank under torchrun); resets the sums."""
        ctx = self.ctx
        stop_flag = torch.zeros(1, device=ctx.device)
        if ctx.metric_mean is not None:
            if self.cb.should_stop is not None and self.cb.should_stop():  # this rank's own request (a host flag)
                stop_flag.fill_(1.0)
            ctx.metric_mean(list(self.sums.values()) + [stop_flag])  # > 0 after the mean: some rank asked
        names = list(self.sums)
        read = torch.cat([torch.stack([self.sums[k].reshape(()) for k in names]) / self.count_since_log,
                          ctx.guard.skipped.reshape(1), stop_flag]).tolist()  # one device read per interval
        values = dict(zip(names, read[:-2]))
        values["lr"] = ctx.optimizer.param_groups[0]["lr"]
        values["skipped_steps"] = int(read[-2])
        elapsed = time.perf_counter() - self.t_start
        values["img_per_s_global"] = ctx.world_size * self.result.images / max(elapsed, 1e-9)
        values["data_share"] = self.result.data_seconds / max(elapsed, 1e-9)
        self.result.means = values
        self.epoch_loss += values["loss"] * self.count_since_log
        self.epoch_count += self.count_since_log
        self.sums, self.count_since_log = {}, 0
        return values, read[-1] > 0

    def finish(self) -> EpochResult:
        result = self.result
        result.seconds = time.perf_counter() - self.t_start
        if self.epoch_count:  # timm's train_loss: the mean over the epoch (over the part run, after a resume)
            result.means = {**result.means, "epoch_loss": self.epoch_loss / self.epoch_count}
        return result


def steps_per_epoch(micro_batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `micro_batches` loader batches (the last step takes the rest)."""
    return -(-micro_batches // accum_steps)


@torch.no_grad()
def evaluate(mixer, loader, *, amp_dtype: torch.dtype | None, device: torch.device, reduce=None) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy of every head the policy names, each backbone run once per batch."""
    mixer.eval()
    heads = mixer.eval_heads()  # name -> (module, head)
    encoders: dict[int, tuple] = {}
    for name, (module, head) in heads.items():
        encoders.setdefault(id(module), (module, []))[1].append((name, head))
    correct = {name: torch.zeros(3, device=device) for name in heads}  # top-1, top-5 counts, loss sum
    total = torch.zeros(1, device=device)
    for x, y in loader:
        with autocast(device, amp_dtype):
            for module, named in encoders.values():
                feat = module.forward_features(x)
                for name, head in named:
                    logits = module.forward_head(feat, head=head)
                    correct[name][:2] += accuracy_topk(logits, y, (1, 5)).float()
                    correct[name][2] += F.cross_entropy(logits.float(), y, reduction="sum")
        total += y.shape[0]
    if reduce is not None:
        for t in list(correct.values()) + [total]:
            reduce(t)
    n = max(total.item(), 1.0)
    out = {"count": int(total.item())}
    for name, c in correct.items():
        top1, top5, loss = (c / n).tolist()
        out[f"{name}_top1"], out[f"{name}_top5"], out[f"{name}_loss"] = 100.0 * top1, 100.0 * top5, loss
    mixer.train()
    return out
