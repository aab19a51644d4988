"""`automix-fast train`: build everything from a resolved TrainConfig and run it.

Single process or under torchrun (DDP by gradient all-reduce: the policies run several
forwards per step, which DDP's wrapper does not support without a static graph). Lambdas are
shared by all ranks (drawn from (seed, step)); permutations are drawn per rank over its own
shard; once the identical initial weights are built, ranks other than 0 reseed torch's
generators (their own DropPath masks). BN running statistics are averaged over ranks before each
evaluation and checkpoint. Logged train metrics are averaged over ranks, eval counts summed. All ranks agree on a stop
(signal) at the same step boundary. Only rank 0 prints, logs and writes files.
See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

from automix_fast import ops, rundir
from automix_fast.config import TrainConfig, config_changes, flag_name, read_stored, save_config
from automix_fast.data import DataSpec, build_loaders, view_options
from automix_fast.data.shards import seed_of
from automix_fast.data.torch_loader import resolve_aug
from automix_fast.engine.checkpoint import (FORMAT, CheckpointManager, check_resume_world_size, check_training_state,
                                           rng_state, set_aside_after, set_rng_state, state_dict_mismatch)
from automix_fast.engine.compile_clock import CompileClock
from automix_fast.engine.distributed import (all_reduce_sum, average_bn_stats, barrier, convert_sync_batchnorm,
                                             flat_allreduce_mean, init_distributed)
from automix_fast.engine.hooks import (BadFilesRecord, BadFilesStop, Checkpoints, EpochEnd, EpochLog, Evaluation,
                                       EvalTimes, StopAgreement)
from automix_fast.engine.initial_checkpoint import load_initial_checkpoint
from automix_fast.engine.metrics import MetricLogger, ProgressLine
from automix_fast.engine.optim import (build_optimizer, check_same_optimizer, host_hyperparameters,
                                      load_state_keeping_settings, start_momentum_at_zero)
from automix_fast.engine.policy import (check_compile_backend, compile_policy, create_policy_model, resolve_amp,
                                        resolve_device, resolve_loader, wrap_policy)
from automix_fast.engine.schedule import build_schedule, resolve_warmup_epochs
from automix_fast.engine.static_step import CUDA_WARMUP_RUNS, StaticStep
from automix_fast.engine.stopflag import StopFlag
from automix_fast.engine.tensorboard_log import require_tensorboard
from automix_fast.engine.train import EpochCallbacks, EpochPlan, NonFiniteError, train_one_epoch
from automix_fast.engine.train_step import StepContext, StepGuard
from automix_fast.engine.train_options import (automix_departures, loop_options, model_options,
                                               optimizer_steps_per_epoch)
from automix_fast.errors import CheckpointError, ConfigError, DataError, OutputError
from automix_fast.models import create_model
from automix_fast.visualize import write_mix_grid


# The stream tag of seed_rank_generators (the data order and augmentation use 0 in that place).
_RANK_GENERATOR_STREAM = 3


def seed_rank_generators(seed: int, rank: int, step: int = 0) -> None:
    """On ranks other than 0, reseed torch's global generators (CPU and every CUDA device) from
    (seed, rank, step): what draws from them during training (DropPath's per-sample masks,
    dropout) then differs between ranks, as each rank's samples do. Rank 0 keeps its stream, so a
    single process draws exactly what it drew before. Called once the weights are built (they
    come from `torch.manual_seed(seed)`, the same on every rank), and on resume at the resumed
    global step, after the checkpoint's (rank 0's) generator state is restored."""
    if rank != 0:
        torch.manual_seed(seed_of(seed, step, rank, _RANK_GENERATOR_STREAM))


def batch_text(batch_size: int, world_size: int, accum_steps: int) -> str:
    """The images per optimizer step, as the start line says it: `256`, or how the global batch
    is made (`32 x 8 procs = 256`, `64 x 2 accum = 128`), since the lr is never rescaled for it."""
    factors = [str(batch_size)]
    if world_size > 1:
        factors.append(f"{world_size} procs")
    if accum_steps > 1:
        factors.append(f"{accum_steps} accum")
    total = batch_size * world_size * accum_steps
    return " x ".join(factors) + (f" = {total}" if len(factors) > 1 else "")


class Trainer:
    """Everything one training run holds, built from a config; `fit` runs it."""

    def __init__(self, cfg: TrainConfig, *, quiet: bool = False, resume_from=None, resolved: bool = False,
                 warning: str | None = None):
        """`resume_from`: (path, state) of the checkpoint to continue from, when the caller has
        already read it (the train command does, for its config); with `resolved` the caller has
        also followed `cfg.run.resume` and None means a fresh start; else `cfg.run.resume` is followed
        here, before any data work. `warning`: the caller's line for stderr, printed with the lines
        before the first step (so a run refused before then prints its one error line alone)."""
        self.cfg = cfg
        self.caller_warning = warning
        self._setup_processes(quiet)
        self._locate_run(resume_from, resolved)
        self._setup_numerics()
        self._build_data(self._probe_model())
        self._build_model()
        self._build_optimizer()
        self.start_epoch, self.start_batch, self.history = 0, 0, []
        seed_rank_generators(self.cfg.run.seed, self.dist.rank)  # the weights are built: each rank its own draws

    # ------------------------------------------------------------------ build
    def _setup_processes(self, quiet: bool) -> None:
        """The device and, under torchrun, the process group; only rank 0 prints."""
        self.device = resolve_device(self.cfg.run.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.quiet = quiet or not self.is_main

    def _locate_run(self, resume_from, resolved: bool) -> None:
        """The run folder and the checkpoint to continue from, checked before any data work."""
        cfg = self.cfg
        if cfg.run.resume == "auto" and not cfg.run.experiment:
            raise ConfigError("--resume auto needs --experiment NAME (the run folder to continue)")
        self.run_dir = rundir.locate(cfg)
        if resume_from is None and cfg.run.resume and not resolved:
            resume_from = rundir.find_resume(cfg)
        if resume_from is not None:  # a mid-epoch state needs the process count that wrote it
            check_resume_world_size(*resume_from, self.dist.world_size)
        self.resume_from = resume_from
        self.forked = resume_from is not None and rundir.forks(resume_from, self.run_dir)
        if self.is_main and (resume_from is None or self.forked):  # a new folder: checked before any data work
            rundir.check_new_run(self.run_dir, named=bool(cfg.run.experiment))
        if self.is_main and cfg.run.log_tensorboard:  # before the run folder is created
            require_tensorboard()

    def _setup_numerics(self) -> None:
        """Determinism, autocast dtype, memory format and kernel backend."""
        cfg = self.cfg
        if cfg.run.deterministic:
            if self.device.type == "cuda":  # deterministic cuBLAS needs this before its first call
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = resolve_amp(cfg.run, self.device)
        self.channels_last = cfg.run.channels_last if cfg.run.channels_last is not None else self.device.type == "cuda"
        try:  # --kernel-backend triton without CUDA or TRITON_INTERPRET: say so before any data work
            ops.resolve_backend(cfg.mixing.kernel_backend, self.device)
        except ValueError as e:
            raise ConfigError(f"--kernel-backend: {e}") from None
        check_compile_backend(cfg.run.torchcompile)

    def _probe_model(self) -> int:
        """Checks the model name and --mix-stage before any data work; returns the image size."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # same on every rank: identical initial weights
        # Unknown model names fail before any data work.
        probe = create_model(cfg.net.model, num_classes=2, **model_options(cfg.net))
        self.mix_stage = cfg.mixing.mix_stage or probe.mix_stage
        if self.mix_stage > probe.num_stages:
            raise ConfigError(f"--mix-stage must be at most {probe.num_stages} for {cfg.net.model}, "
                              f"got {self.mix_stage}")
        return cfg.data.img_size or probe.default_img_size

    def _build_data(self, img_size: int) -> None:
        """The train and validation loaders and what they hold."""
        data, cuda = self.cfg.data, self.device.type == "cuda"
        self.loader_kind = resolve_loader(data.loader)
        self.spec = DataSpec(
            dataset=data.dataset, data_dir=data.data_dir, img_size=img_size, batch_size=data.batch_size,
            eval_batch_size=data.validation_batch_size or 2 * data.batch_size, workers=data.workers,
            device=self.device, channels_last=self.channels_last,
            dtype=self.amp_dtype if (self.amp_dtype is not None and cuda) else torch.float32,
            loader=self.loader_kind, aug=data.aug, crop_padding_mode=data.crop_padding_mode,
            rank=self.dist.rank, world_size=self.dist.world_size,
            seed=self.cfg.run.seed, skip_bad_images=data.skip_bad_images,
            train_subset=data.train_subset, train_subset_seed=data.train_subset_seed, val_split=data.val_split,
            **view_options(data),
        )
        self.train_loader, self.val_loader, self.info = build_loaders(self.spec)
        if data.num_classes is not None and data.num_classes != self.info.num_classes:
            raise ConfigError(f"--num-classes is {data.num_classes} but the data has {self.info.num_classes} classes")
        self.num_classes = self.info.num_classes

    def _build_model(self) -> None:
        """The model on its device and the mixing policy that trains it."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        model = create_policy_model(cfg, self.num_classes)
        if cfg.run.sync_bn and self.dist.is_distributed:
            model = convert_sync_batchnorm(model, self.device)  # a CPU version where torch's needs a GPU
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mixer = wrap_policy(cfg, model, mix_stage=self.mix_stage, rank=self.dist.rank).to(self.device)
        run = cfg.run
        self.compile_note = compile_policy(self.mixer, run.torchcompile, mode=run.torchcompile_mode,
                                           scope=run.torchcompile_scope, mix=cfg.mixing.mix) if run.torchcompile else None
        self.compile_clock = CompileClock() if run.torchcompile else None
        self.terms = self.mixer.summed_terms  # the loss terms the shown loss sums

    def _build_optimizer(self) -> None:
        """The optimizer, its learning-rate schedule, the fp16 loss scaler and the bad-step guard."""
        optim, sched = self.cfg.optim, self.cfg.schedule
        groups = self.mixer.param_groups(
            optim.lr, optim.weight_decay, sched.min_lr, mix_block_lr=optim.mix_block_lr,
            mix_block_min_lr=sched.mix_block_min_lr, mix_block_weight_decay=optim.mix_block_weight_decay,
            mix_block_momentum=optim.mix_block_momentum,
            decay_norm_and_bias=optim.decay_norm_and_bias,
        )
        self.optimizer = build_optimizer(groups, optim.opt, lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay, device=self.device,
                                         fused=self.cfg.run.cuda_graph)
        self.steps_per_epoch = optimizer_steps_per_epoch(optim, len(self.train_loader))
        self.total_steps = sched.epochs * self.steps_per_epoch
        self.warmup_epochs, self.warmup_note = resolve_warmup_epochs(sched.warmup_epochs, sched.epochs)
        self.schedule = build_schedule(
            sched.sched, [g["lr"] for g in groups], total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            warmup_steps=int(self.warmup_epochs * self.steps_per_epoch), floors=[g["min_lr"] for g in groups],
            decay_epochs=sched.decay_epochs, decay_milestones=sched.decay_milestones or (), decay_rate=sched.decay_rate,
            warmup_lr=sched.warmup_lr, on_updates=sched.sched_on_updates,
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.guard = StepGuard(self.device)

    # ------------------------------------------------------------------ state
    def state(self, next_epoch: int, next_batch: int) -> dict:
        """The training checkpoint's contents for a run that continues at (next_epoch, next_batch)."""
        return {
            "format": FORMAT,
            "config": self.cfg.to_flat(),
            "model_name": self.cfg.net.model,
            "num_classes": self.num_classes,
            "classes": list(self.info.classes),
            # the data folder made absolute: eval finds it (and knows it) from any working directory
            "data_root": os.path.abspath(self.cfg.data.data_dir) if self.cfg.data.data_dir else None,
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "world_size": self.dist.world_size,  # a mid-epoch state resumes only with this many processes
            "mixer": self.mixer.state_dict(),
            "optimizer": host_hyperparameters(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": int(self.guard.skipped.item()),
            "rng": rng_state(),
            "history": json.dumps(self.history),
        }

    def load_state(self, path, state: dict) -> None:
        """Continue from a training checkpoint read from `path` (checked against this run: its
        model, class count and class names, and its config; its process count was checked with
        the run folder, before any data work)."""
        check_training_state(path, state)
        if state.get("model_name") != self.cfg.net.model or state.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"{path} holds model '{state.get('model_name')}' with num_classes {state.get('num_classes')}, "
                f"but this run has model '{self.cfg.net.model}' with num_classes {self.num_classes}"
            )
        other_labels = self.info.class_difference(state["classes"]) if state.get("classes") else None
        if other_labels:  # the head's outputs would change meaning: no flag allows it
            raise DataError(f"resuming {path}: the classes of {self.info.root} are not the ones it was trained on "
                            f"({other_labels}); a resumed run keeps its labels, even with --allow-config-change "
                            "(resume with the data it was trained on, or start a new run from its weights with "
                            "--initial-checkpoint)")
        changed = config_changes(state.get("config", {}), self.cfg)
        if changed and not self.cfg.run.allow_config_change:
            old, now = read_stored(state["config"]), self.cfg.to_flat()
            details = ", ".join(f"{flag_name(k)}: {old[k]!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"resuming {path} with a changed config ({details}); pass --allow-config-change to accept")
        check_same_optimizer(state.get("config", {}).get("opt", self.cfg.optim.opt), self.cfg.optim.opt, path)
        try:
            self.mixer.load_state_dict(state["mixer"])
            load_state_keeping_settings(self.optimizer, state["optimizer"])
            start_momentum_at_zero(self.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not match this model: {state_dict_mismatch(e)}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.guard.skipped.fill_(state.get("skipped_steps", 0))
        set_rng_state(state["rng"])  # rank 0's generators, as they were when the checkpoint was written
        self.start_epoch, self.start_batch = state["next_epoch"], state["next_batch"]
        seed_rank_generators(self.cfg.run.seed, self.dist.rank,
                             self.start_epoch * self.steps_per_epoch + self.start_batch)
        self.history = json.loads(state.get("history", "[]"))

    def resolved(self) -> dict:
        """What the null/auto fields of the config became on this machine (for config.yaml)."""
        return {
            "dataset": self.info.kind, "loader": self.loader_kind, "device": self.device.type,
            "img_size": self.spec.img_size, "aug": resolve_aug(self.spec), "num_classes": self.num_classes,
            "validation_batch_size": self.spec.eval_batch_size, "mix_stage": self.mix_stage,
            "mix_alpha": self._mix_alpha(), "amp": self.amp_dtype is not None,
            "channels_last": self.channels_last,
            "kernel_backend": ops.resolve_backend(self.cfg.mixing.kernel_backend, self.device),
            "warmup_epochs": self.warmup_epochs,
        }

    def _mix_alpha(self) -> float | None:
        """The alpha --mix-alpha null resolved to (None where timm's --mixup/--cutmix set them)."""
        if self.cfg.mixing.mix == "automix" or (self.cfg.mixing.mix in ("mixup", "cutmix")
                                         and self.cfg.mixing.mixup is None and self.cfg.mixing.cutmix is None):
            return self.mixer.mix_alpha(self.cfg.mixing.mix)
        return None

    def header(self) -> str:
        cfg, amp = self.cfg, self.amp_dtype
        return (
            f"automix-fast: {self.mixer.label} on {self.info.kind} ({self.info.num_train} train / {self.info.num_val} val, "
            f"{self.num_classes} classes, {self.spec.img_size}px), {cfg.net.model}, {self.device.type}"
            f"{' x' + str(self.dist.world_size) if self.dist.is_distributed else ''}, loader {self.loader_kind}, "
            f"amp {str(amp).replace('torch.', '') if amp is not None else 'off'}, "
            f"{'channels-last' if self.channels_last else 'NCHW'}, "
            f"{cfg.schedule.epochs} epoch{'s' if cfg.schedule.epochs != 1 else ''} x {self.steps_per_epoch} steps, "
            f"batch {batch_text(self.spec.batch_size, self.dist.world_size, cfg.optim.grad_accum_steps)}, "
            f"lr {cfg.optim.lr:g}"
        )

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)


    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        """Train from the start (or the checkpoint) to the last epoch or a stop; returns the summary."""
        found = self._start_state()
        self._open_run_folder(found)
        checkpoints = Checkpoints(CheckpointManager(self.run_dir, keep_recent=self.cfg.run.checkpoint_hist), self.mixer,
                                  self.state, self.run_dir, write=self.is_main, rank=self.dist.rank)
        if found is not None:
            checkpoints.last_good = (found[0], self.start_epoch, self.start_batch)
        if self.forked:  # the fork's own first checkpoint; its best.pt compares its own epochs
            checkpoints.save(self.state(self.start_epoch, self.start_batch), mid_epoch=True)
        elif found is not None:
            checkpoints.manager.restore(found[1])
        logger = MetricLogger(self.run_dir, enabled=self.is_main, tensorboard=self.cfg.run.log_tensorboard)
        self.info.bad_files.start_run(self.run_dir)  # a resumed run plans around the files its folder lists
        self._announce()
        stop = StopFlag().install()
        evaluation, hooks = self._epoch_end_hooks(logger, checkpoints, stop)
        eval_times = EvalTimes(self.cfg.run.eval_interval, self.cfg.schedule.epochs)
        t_run = time.perf_counter()
        try:
            with self.compile_clock or contextlib.nullcontext():
                ctx = self._step_context()
                for epoch in range(self.start_epoch, self.cfg.schedule.epochs):
                    end = self._train_epoch(ctx, epoch, logger, stop, eval_times.seconds_left(epoch))
                    evaluating = 0.0  # host seconds of this epoch's evaluation and checkpoint write
                    for hook in hooks:
                        started = time.perf_counter()
                        hook.epoch_end(end)
                        if hook is evaluation or hook is checkpoints:
                            evaluating += time.perf_counter() - started
                    if end.eval:
                        eval_times.add(evaluating)
                    if self.compile_clock is not None and (note := self.compile_clock.note()):
                        self.log(note)
                    if end.outcome is not None:
                        return end.outcome
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {checkpoints.describe_last_good()}") from None
        except OutputError as e:
            raise OutputError(f"{e}; {checkpoints.describe_last_good()}") from None
        finally:
            stop.restore()
            logger.close()
        return self._finish(evaluation.latest, stop, time.perf_counter() - t_run)

    def _start_state(self):
        """Loads the checkpoint to continue from (returned as (path, state), or None), or timm's
        --initial-checkpoint weights for a fresh start."""
        cfg, found = self.cfg, self.resume_from
        if found is not None:
            path, state = found
            self.load_state(path, state)
            if self.forked:
                self.log(f"forked from {path} (left as it is) at epoch {self.start_epoch + 1}, batch {self.start_batch}")
            else:
                self.log(f"resumed from {path} at epoch {self.start_epoch + 1}, batch {self.start_batch}")
            if self._other_world_size(state):
                written = state["world_size"]
                self.log(f"{path} was written by {written} process{'es' if written > 1 else ''} and this run has "
                         f"{self.dist.world_size}: {self.steps_per_epoch} steps per epoch from here, and the "
                         "schedule, the mixing draws and the logged steps follow that count")
        elif cfg.net.initial_checkpoint:  # timm's --initial-checkpoint: a fresh start from its weights only
            source = load_initial_checkpoint(self.mixer, cfg.net.initial_checkpoint, cfg.net.model, self.num_classes)
            self.log(f"model weights from {cfg.net.initial_checkpoint}" + (f" ({source})" if source else ""))
        return found

    def _other_world_size(self, state: dict) -> bool:
        """Whether a state (at an epoch's end: check_resume_world_size refuses the others) was
        written by another number of processes than this run has."""
        return state.get("world_size", self.dist.world_size) != self.dist.world_size

    def _open_run_folder(self, found) -> None:
        """Rank 0 claims the run folder (or trims a resumed run's metrics), removes the temp files
        of writes whose process was killed, and writes config.yaml."""
        if not self.is_main:
            return
        if found is None:  # a new run: its own folder (a suffixed default name when taken)
            self.run_dir = rundir.claim(self.run_dir, named=bool(self.cfg.run.experiment))
        elif self.forked:  # continuing elsewhere: into a new folder (or one that holds no run)
            rundir.claim(self.run_dir, named=True)
        else:  # steps logged after that checkpoint (a kill, an abandoned continuation) are logged again from here
            if self._other_world_size(found[1]):  # an epoch end: the steps logged so far counted other epochs
                rundir.trim_metrics(self.run_dir, epoch=self.start_epoch)
            else:
                rundir.trim_metrics(self.run_dir, self.start_epoch * self.steps_per_epoch + self.start_batch)
            moved = set_aside_after(self.run_dir, self.start_epoch, resumed_from=found[0])
            if moved:
                self.log(f"set aside (not deleted) the later checkpoints this run replaces: "
                         f"{', '.join(f'{a.name} -> {b.name}' for a, b in moved)}")
        stale = rundir.clear_stale_temps(self.run_dir)
        if stale:
            self.log(stale)
        save_config(self.cfg, str(self.run_dir / rundir.CONFIG_FILE), self.resolved())

    def _announce(self) -> None:
        """The lines printed before the first step."""
        if self.caller_warning and not self.quiet:
            print(self.caller_warning, file=sys.stderr, flush=True)
        self.log(self.header())
        if self.terms:
            self.log(f"loss shown = {' + '.join(self.terms)} (each logged in metrics.jsonl)")
        departures = automix_departures(self.cfg.mixing)
        if departures:
            self.log(f"not the official AutoMix step: {'; '.join(departures)}")
        if self.warmup_note and not self.quiet:
            print(self.warmup_note, file=sys.stderr if self.warmup_note.startswith("warning") else sys.stdout, flush=True)
        if self.compile_note:
            self.log(self.compile_note)
        if self.cfg.run.cuda_graph:
            self.log("step: static buffers, each kind of step captured as CUDA graphs at its "
                     f"run number {CUDA_WARMUP_RUNS + 2} and replayed" if self.device.type == "cuda" else
                     "step: static buffers without capture (--cuda-graph on a CPU: nothing to capture, no speed-up)")
        self.log(f"run folder: {self.run_dir}")

    def _epoch_end_hooks(self, logger, checkpoints: Checkpoints, stop: StopFlag) -> tuple[Evaluation, list]:
        """The hooks called at each epoch's end, in order (the evaluation hook also on its own)."""
        distributed = self.dist.is_distributed
        evaluation = Evaluation(self.cfg, self.mixer, self.val_loader, amp_dtype=self.amp_dtype, device=self.device,
                                reduce=all_reduce_sum if distributed else None, history=self.history)
        bad_files = self.info.bad_files  # files that fail to decode mid-run: automix_fast/data/bad_files.py
        return evaluation, [
            evaluation,
            BadFilesRecord(bad_files, logger, self.run_dir, write=self.is_main, distributed=distributed),
            EpochLog(self.history, logger, self.mixer, self.run_dir, write=self.is_main, log=self.log),
            checkpoints,
            BadFilesStop(bad_files),  # --skip-bad-images off: stop now, the checkpoint written
            StopAgreement(self.cfg.schedule, stop, self.run_dir, device=self.device, world_size=self.dist.world_size,
                          distributed=distributed, log=self.log),
        ]

    def _step_context(self) -> StepContext:
        """What every step uses; under torchrun gradients and logged values are averaged over ranks."""
        mean = flat_allreduce_mean if self.dist.is_distributed else None
        ctx = StepContext(self.mixer, self.optimizer, self.schedule, self.guard, self.total_steps,
                          amp_dtype=self.amp_dtype, scaler=self.scaler, grad_sync=mean, metric_mean=mean,
                          max_bad_steps=self.cfg.run.max_bad_steps, world_size=self.dist.world_size,
                          **loop_options(self.cfg.optim, heads=self.mixer.head_parameters()))
        if self.cfg.run.cuda_graph:
            ctx.stepper = StaticStep(ctx, capture=self.device.type == "cuda")
        return ctx

    def _train_epoch(self, ctx: StepContext, epoch: int, logger, stop: StopFlag, run_extra_s: float) -> EpochEnd:
        """One epoch's steps, with its progress line and train records; then BN statistics are
        averaged over ranks (torchrun). `run_extra_s`: the evaluations still to come, for the run's eta."""
        skip = self.start_batch if epoch == self.start_epoch else 0
        log_interval = self.cfg.run.log_interval
        progress = ProgressLine(epoch + 1, self.cfg.schedule.epochs, self.steps_per_epoch, log_interval=log_interval,
                                enabled=not self.quiet, start_step=skip,
                                world_size=self.dist.world_size, terms=self.terms, run_extra_s=run_extra_s)

        def on_log(i, values):
            logger.log("train", values, epoch=epoch + 1, step=epoch * self.steps_per_epoch + i)

        # Under torchrun the ranks agree on `stop` at log steps (inside the metrics collective);
        # epoch ends agree with one any_rank (StopAgreement).
        callbacks = EpochCallbacks(log_interval=log_interval, on_log=on_log, progress=progress, should_stop=stop)
        try:
            result = train_one_epoch(ctx, self.train_loader, EpochPlan(epoch, epoch * self.steps_per_epoch, skip),
                                     callbacks)
        finally:
            progress.close()
        note = ctx.stepper.capture_note() if isinstance(ctx.stepper, StaticStep) else None
        if note:
            self.log(note)
        if self.dist.is_distributed:
            average_bn_stats(self.mixer)
        return EpochEnd(epoch, skip, result, self.steps_per_epoch)

    def _finish(self, eval_result: dict, stop: StopFlag, seconds: float) -> dict:
        """summary.json and mixes.png (rank 0); the summary (with a signal that came after the last step)."""
        cfg = self.cfg
        summary = rundir.run_summary(
            cfg, self.run_dir, self.history, eval_result, heads=list(self.mixer.eval_heads()),
            skipped_steps=int(self.guard.skipped.item()), train_seconds=seconds,
            compile_seconds=self.compile_clock.seconds if self.compile_clock else None)
        summary["is_main"] = self.is_main
        if self.is_main:
            rundir.write_json(self.run_dir / rundir.SUMMARY_FILE, summary, "summary")
            if cfg.run.visualize and cfg.mixing.mix == "automix":
                png, _ = write_mix_grid(self.mixer, self.val_loader, self.run_dir / "mixes.png", self.spec,
                                        classes=self.info.classes)
                summary["mixes_png"] = str(png)
        summary["signal"] = stop.signal  # a SIGTERM/SIGINT that came after the last step (not in summary.json)
        if self.dist.is_distributed:
            barrier()  # no rank leaves (and tears down gloo/NCCL) while another is still writing
        return summary
