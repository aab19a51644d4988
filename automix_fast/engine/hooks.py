"""What happens at the end of each training epoch, one object per job.

`Trainer.fit` runs an epoch, then calls `epoch_end(end)` on each hook in its list, in order;
a hook reads what the epoch did from the `EpochEnd` record and leaves what later hooks need
(the evaluation, or the outcome of a run that stops here) on it. An epoch cut short by a stop
request (`end.mid_epoch`) gets its bad-files record, a mid-epoch checkpoint and the stop
message; a finished epoch gets all the hooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from automix_fast import rundir
from automix_fast.engine.distributed import any_rank
from automix_fast.engine.summary_csv import write_summary_csv
from automix_fast.engine.train import EpochResult, NonFiniteError, evaluate

# Test/debug hook: when set, every rank writes its policy state (weights, Mix Block, momentum
# encoder, BN buffers) to $AUTOMIX_FAST_RANK_STATE_DIR/rank<r>.pt at the end of each epoch, so a
# test can check that all ranks hold identical parameters. Normal runs never set it.
RANK_STATE_ENV = "AUTOMIX_FAST_RANK_STATE_DIR"


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN/inf, or None (one host sync)."""
    tensors = [(n, t) for n, t in module.state_dict().items() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return None
    bad = torch.stack([(~torch.isfinite(t)).any() for _, t in tensors])
    if not bad.any().item():
        return None
    return tensors[int(bad.nonzero()[0].item())][0]


@dataclass
class EpochEnd:
    """One epoch's end as the hooks see it: `epoch` (0-based), `skip` (steps run before this
    call, a resumed epoch), what train_one_epoch returned; `eval` and `outcome` are set by hooks
    (`outcome`: what fit returns when the run stops here)."""

    epoch: int
    skip: int
    result: EpochResult
    steps_per_epoch: int
    eval: dict = field(default_factory=dict)
    outcome: dict | None = None

    @property
    def mid_epoch(self) -> bool:
        """A stop request ended the epoch before its last step."""
        return self.result.stopped and self.skip + self.result.steps < self.steps_per_epoch

    @property
    def next_position(self) -> tuple[int, int]:
        """(next_epoch, next_batch) a checkpoint written now continues from."""
        if self.mid_epoch:
            return self.epoch, self.skip + self.result.steps
        return self.epoch + 1, 0

    @property
    def step(self) -> int:
        """The global step reached."""
        next_epoch, next_batch = self.next_position
        return next_epoch * self.steps_per_epoch + next_batch


def evaluates(epoch: int, eval_interval: int, epochs: int) -> bool:
    """Whether the end of (0-based) `epoch` evaluates: every `eval_interval`-th epoch and the last."""
    return (epoch + 1) % eval_interval == 0 or epoch + 1 == epochs


class EvalTimes:
    """Host seconds of the evaluations measured so far, each with its epoch's checkpoint write;
    `seconds_left(epoch)` is their mean times the evaluations from `epoch`'s end on (0 before any
    was measured): the part of the run's time left that the training steps' rate does not see."""

    def __init__(self, eval_interval: int, epochs: int):
        self.eval_interval, self.epochs = eval_interval, epochs
        self.seconds: list[float] = []

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def seconds_left(self, epoch: int) -> float:
        if not self.seconds:
            return 0.0
        to_come = sum(evaluates(e, self.eval_interval, self.epochs) for e in range(epoch, self.epochs))
        return to_come * sum(self.seconds) / len(self.seconds)


class Evaluation:
    """Evaluates every --eval-interval epochs and after the last; `latest` is the newest result."""

    def __init__(self, cfg, mixer, loader, *, amp_dtype, device, reduce, history: list):
        self.cfg, self.mixer, self.loader = cfg, mixer, loader
        self.amp_dtype, self.device, self.reduce = amp_dtype, device, reduce
        self.latest = next((h["eval"] for h in reversed(history) if h["eval"]), {})

    def epoch_end(self, end: EpochEnd) -> None:
        if end.mid_epoch:
            return
        # --eval-interval: long runs on a CPU evaluate every k-th epoch (and always the last).
        evaluating = evaluates(end.epoch, self.cfg.run.eval_interval, self.cfg.schedule.epochs)
        end.eval = (evaluate(self.mixer, self.loader, amp_dtype=self.amp_dtype, device=self.device,
                             reduce=self.reduce) if evaluating else {})
        self.latest = end.eval or self.latest


class BadFilesRecord:
    """Merges the ranks' lists of undecodable files, logs their counts, rewrites bad_images.txt."""

    def __init__(self, bad_files, logger, run_dir: Path, *, write: bool, distributed: bool):
        self.bad_files, self.logger, self.run_dir = bad_files, logger, run_dir
        self.write, self.distributed = write, distributed

    def epoch_end(self, end: EpochEnd) -> None:
        self.bad_files.end_epoch(self.logger, epoch=end.epoch + 1, step=end.step, run_dir=self.run_dir,
                                 write=self.write, distributed=self.distributed)


class EpochLog:
    """A finished epoch's history entry, summary.csv, eval record (metrics.jsonl) and eval line."""

    def __init__(self, history: list, logger, mixer, run_dir: Path, *, write: bool, log: Callable[[str], None]):
        self.history, self.logger, self.mixer, self.run_dir = history, logger, mixer, run_dir
        self.write, self.log = write, log

    def epoch_end(self, end: EpochEnd) -> None:
        if end.mid_epoch:
            return
        self.history.append({"epoch": end.epoch + 1, "train": end.result.means, "eval": end.eval})
        if self.write:
            write_summary_csv(self.run_dir / "summary.csv", self.history, list(self.mixer.eval_heads()))
        if end.eval:
            self.logger.log("eval", end.eval, epoch=end.epoch + 1, step=end.step)
            self.log("  eval " + "  ".join(
                f"{h} {end.eval[h + '_top1']:.2f}/{end.eval[h + '_top5']:.2f}" for h in self.mixer.eval_heads()
            ) + "  (top-1/top-5 %)")


class Checkpoints:
    """Writes last/best/history checkpoints (rank 0) through `manager`, never one holding NaN/inf
    (every rank checks, so all ranks raise together); remembers the newest one written. With
    $AUTOMIX_FAST_RANK_STATE_DIR set, every rank also dumps its own policy state."""

    def __init__(self, manager, mixer, state: Callable[[int, int], dict], run_dir: Path, *, write: bool, rank: int):
        self.manager, self.mixer, self.state, self.run_dir = manager, mixer, state, run_dir
        self.write, self.rank = write, rank
        self.last_good = None  # (path, next_epoch, next_batch) of the newest checkpoint

    def epoch_end(self, end: EpochEnd) -> None:
        if end.mid_epoch:
            self.save(self.state(*end.next_position), mid_epoch=True)
            return
        main_head = next(iter(self.mixer.eval_heads()))
        self.save(self.state(*end.next_position), epoch=end.epoch + 1,
                  metric=end.eval[main_head + "_top1"] if end.eval else None)

    def save(self, state: dict, *, epoch: int | None = None, metric=None, mid_epoch: bool = False) -> None:
        """A mid-epoch state goes to last.pt only; an epoch's to last, best and the history."""
        bad = first_nonfinite(self.mixer)
        if bad is not None:
            raise NonFiniteError(f"'{bad}' holds NaN/inf values; "
                                 "not writing it to a checkpoint")
        if self.write:
            if mid_epoch:
                self.manager.save_last(state)
            else:
                self.manager.save(state, epoch, metric=metric)
            self.last_good = (self.run_dir / "last.pt", state["next_epoch"], state["next_batch"])
        debug_dir = os.environ.get(RANK_STATE_ENV)
        if debug_dir:
            Path(debug_dir).mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.mixer.state_dict().items()},
                       Path(debug_dir) / f"rank{self.rank}.pt")

    def describe_last_good(self) -> str:
        if self.last_good is None:
            return f"no checkpoint was written in {self.run_dir}"
        path, epoch, batch = self.last_good
        where = f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
        return f"the last good checkpoint is {path} ({where})"


class BadFilesStop:
    """With --skip-bad-images off: stops the run (a DataError) after a finished epoch's
    checkpoint when files were left out of it."""

    def __init__(self, bad_files):
        self.bad_files = bad_files

    def epoch_end(self, end: EpochEnd) -> None:
        if not end.mid_epoch:
            self.bad_files.stop_after_epoch()


class StopAgreement:
    """Ends the run on a stop request (a signal): at once when it cut the epoch short, else after
    the finished epoch when any rank got one (all ranks agree), unless that was the last epoch."""

    def __init__(self, schedule, stop, run_dir: Path, *, device, world_size: int, distributed: bool,
                 log: Callable[[str], None]):
        self.schedule, self.stop, self.run_dir, self.device = schedule, stop, run_dir, device
        self.world_size, self.distributed, self.log = world_size, distributed, log

    def epoch_end(self, end: EpochEnd) -> None:
        if end.mid_epoch:
            end.outcome = self._stopped(f"stopped by {self.stop.name}")
            return
        stopping = any_rank(self.stop(), self.device) if self.distributed else self.stop()
        if stopping and end.epoch + 1 < self.schedule.epochs:  # after the last epoch: the run finishes
            end.outcome = self._stopped(f"stopped by {self.stop.name} after epoch {end.epoch + 1}")

    def _stopped(self, what: str) -> dict:
        self.log(f"{what}; checkpoint written to {self.run_dir / 'last.pt'}")
        self.log(f"continue with: {rundir.resume_command(self.run_dir, self.world_size)}")
        return {"stopped": True, "run_dir": str(self.run_dir), "signal": self.stop.signal}
