"""The training and evaluation loops, with explicit arguments (objects, no argument namespace).

Inside a step nothing waits on the device: lambdas are host floats, the non-finite check
writes a device flag that the fused optimizer reads to skip its update, and running sums
stay on the device until a log interval reads them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from automix_fast.engine.metrics import accuracy_topk
from automix_fast.engine.static_step import EagerStep
from automix_fast.engine.train_step import StepContext, autocast
from automix_fast.errors import CheckpointError, UserError


class NonFiniteError(UserError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class EpochResult:
    steps: int = 0  # steps run in this call
    stopped: bool = False  # a stop was requested before the epoch ended
    means: dict = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0


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
    those intervals, so drawing the bar never waits on the device; progress.start_clock() once,
    before the first step (after a resumed epoch's replay of the batches it had done, by a loader
    that cannot start mid-epoch). Under torchrun should_stop
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


def _start_loader(loader, batches_done: int) -> int:
    """Have `loader`'s next iteration start after `batches_done` loader batches of its epoch
    (`start_at`, docs/INTERNALS.md's loader contract); returns how many batches the caller must
    still read and drop: `batches_done` for a loader without start_at, else 0."""
    start_at = getattr(loader, "start_at", None)
    if batches_done == 0 or start_at is None:
        return batches_done
    start_at(batches_done)
    return 0


class _EpochRun:
    """One call of train_one_epoch: the data iterator and the running sums between log reads."""

    def __init__(self, ctx: StepContext, loader, plan: EpochPlan, callbacks: EpochCallbacks):
        self.ctx, self.plan, self.cb = ctx, plan, callbacks
        ctx.mixer.train()
        loader.set_epoch(plan.epoch)
        self.stepper = ctx.stepper if ctx.stepper is not None else EagerStep(ctx)  # runs each optimizer step
        self.micro_batches = len(loader)
        self.batches = steps_per_epoch(self.micro_batches, ctx.accum_steps)  # optimizer steps
        self.result = EpochResult()
        self.count_since_log = 0  # micro-batches
        self.epoch_loss, self.epoch_count = 0.0, 0  # host floats from the interval reads: the epoch's mean loss
        self.lr = 0.0  # the first group's, as the schedule set it (a host float)
        if plan.skip >= self.batches:
            raise CheckpointError(
                f"the checkpoint stopped after batch {plan.skip} of epoch {plan.epoch + 1}, but an epoch now has "
                f"only {self.batches} batches (batch size or process count changed?); resume from an epoch checkpoint"
            )
        replayed = _start_loader(loader, plan.skip * ctx.accum_steps)
        self.it = iter(loader)
        for _ in range(replayed):  # a loader that cannot start mid-epoch: read the batches done again
            next(self.it)
        if callbacks.progress is not None:  # the console's rate covers the steps, as the logged one
            callbacks.progress.start_clock(replayed=replayed > 0)
        self.t_start = time.perf_counter()

    def step(self, i: int) -> bool:
        """Optimizer step i of the epoch; True when the loop should stop after it."""
        ctx, cb = self.ctx, self.cb
        step = self.plan.start_step + i
        self.lr = ctx.schedule.apply(ctx.optimizer, step)[0]
        micro = min(ctx.accum_steps, self.micro_batches - i * ctx.accum_steps)
        self.data_time = 0.0
        step_images = self.stepper.run(step, micro, self._micro_batches(micro))
        self.count_since_log += micro
        data_time = self.data_time
        self.result.data_seconds += data_time
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
            cb.progress.update(lr=self.lr, images=step_images, data_time=data_time)
        if logging_now:
            stop = self._log(i, step, step_images, data_time) or stop
        return stop

    def _micro_batches(self, micro: int):
        """The step's `micro` loader batches, timing the waits for them (self.data_time)."""
        for _ in range(micro):
            t0 = time.perf_counter()
            batch = next(self.it)
            self.data_time += time.perf_counter() - t0
            yield batch

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
            ctx.metric_mean(list(self.stepper.sums.values()) + [stop_flag])  # > 0 after the mean: some rank asked
        sums = self.stepper.sums
        names = list(sums)
        read = torch.cat([torch.stack([sums[k].reshape(()) for k in names]) / self.count_since_log,
                          ctx.guard.skipped.reshape(1), stop_flag]).tolist()  # one device read per interval
        values = dict(zip(names, read[:-2]))
        values["lr"] = self.lr
        values["skipped_steps"] = int(read[-2])
        elapsed = time.perf_counter() - self.t_start
        values["img_per_s_global"] = ctx.world_size * self.result.images / max(elapsed, 1e-9)
        values["data_share"] = self.result.data_seconds / max(elapsed, 1e-9)
        self.result.means = values
        self.epoch_loss += values["loss"] * self.count_since_log
        self.epoch_count += self.count_since_log
        self.stepper.reset_sums()
        self.count_since_log = 0
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
        # Divided on the host in float64 (the counts are exact in float32), as `automix-fast eval`
        # divides: the same percentages to the last digit.
        top1, top5, loss = c.tolist()
        out[f"{name}_top1"], out[f"{name}_top5"], out[f"{name}_loss"] = 100.0 * top1 / n, 100.0 * top5 / n, loss / n
    mixer.train()
    return out
