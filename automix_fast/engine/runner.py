"""`automix-fast train`: build everything from a resolved TrainConfig and run it.

Single process or under torchrun (DDP by gradient all-reduce: the policies run several
forwards per step, which DDP's wrapper does not support without a static graph). Lambdas are
shared by all ranks (drawn from (seed, step)); permutations are drawn per rank over its own
shard. BN running statistics are averaged over ranks before each evaluation and checkpoint.
Logged train metrics are averaged over ranks, eval counts summed. All ranks agree on a stop
(signal) at the same step boundary. Only rank 0 prints, logs and writes files.
See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from automix_fast import rundir
from automix_fast.config import TrainConfig, config_changes, flag_name, save_config
from automix_fast.engine.policy import resolve_amp, resolve_device, resolve_loader
from automix_fast.engine.stopflag import StopFlag
from automix_fast.engine.train import NonFiniteError
from automix_fast.errors import CheckpointError, ConfigError, OutputError
from automix_fast.mixing.automix import mask_summary

FORMAT = "automix-fast/1"


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN/inf, or None (one host sync)."""
    tensors = [(n, t) for n, t in module.state_dict().items() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return None
    bad = torch.stack([(~torch.isfinite(t)).any() for _, t in tensors])
    if not bad.any().item():
        return None
    return tensors[int(bad.nonzero()[0].item())][0]


# Test/debug hook: when set, every rank writes its policy state (weights, Mix Block, momentum
# encoder, BN buffers) to $AUTOMIX_FAST_RANK_STATE_DIR/rank<r>.pt at the end of each epoch, so a
# test can check that all ranks hold identical parameters. Normal runs never set it.
RANK_STATE_ENV = "AUTOMIX_FAST_RANK_STATE_DIR"


class Trainer:
    """Everything one training run holds, built from a config."""

    def __init__(self, cfg: TrainConfig, *, quiet: bool = False, resume_from=None, resolved: bool = False):
        """`resume_from`: (path, state) of the checkpoint to continue from, when the caller has
        already read it (the train command does, for its config); with `resolved` the caller has
        also followed `cfg.resume` and None means a fresh start; else `cfg.resume` is followed
        here, before any data work."""
        from automix_fast.data import DataSpec, build_loaders
        from automix_fast.engine.distributed import init_distributed
        from automix_fast.engine.optim import build_optimizer
        from automix_fast.engine.schedule import build_schedule, resolve_warmup_epochs
        from automix_fast.engine.train import StepGuard
        from automix_fast.engine.policy import create_policy_model, wrap_policy
        from automix_fast.engine.train_options import model_options, optimizer_steps_per_epoch
        from automix_fast.models import create_model

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.quiet = quiet or not self.is_main
        if cfg.resume == "auto" and not cfg.experiment:
            raise ConfigError("--resume auto needs --experiment NAME (the run folder to continue)")
        self.run_dir = rundir.locate(cfg)
        if resume_from is None and cfg.resume and not resolved:
            resume_from = rundir.find_resume(cfg)
        self.resume_from = resume_from
        self.forked = resume_from is not None and rundir.forks(resume_from, self.run_dir)
        if self.is_main and (resume_from is None or self.forked):  # a new folder: checked before any data work
            rundir.check_new_run(self.run_dir, named=bool(cfg.experiment))
        if self.is_main and cfg.log_tensorboard:  # before the run folder is created
            from automix_fast.engine.tensorboard_log import require_tensorboard

            require_tensorboard()
        if cfg.deterministic:
            if self.device.type == "cuda":  # deterministic cuBLAS needs this before its first call
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        cuda = self.device.type == "cuda"
        self.amp_dtype = resolve_amp(cfg, self.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
        from automix_fast import ops

        try:  # --kernel-backend triton without CUDA or TRITON_INTERPRET: say so before any data work
            ops.resolve_backend(cfg.kernel_backend, self.device)
        except ValueError as e:
            raise ConfigError(f"--kernel-backend: {e}") from None

        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
        probe = create_model(cfg.model, num_classes=2, **model_options(cfg))  # unknown model names fail before any data work
        img_size = cfg.img_size or probe.default_img_size
        self.mix_stage = cfg.mix_stage or probe.mix_stage
        if self.mix_stage > probe.num_stages:
            raise ConfigError(f"--mix-stage must be at most {probe.num_stages} for {cfg.model}, got {self.mix_stage}")
        del probe
        self.loader_kind = resolve_loader(cfg.loader)
        self.spec = DataSpec(
            dataset=cfg.dataset, data_dir=cfg.data_dir, img_size=img_size, batch_size=cfg.batch_size,
            eval_batch_size=cfg.validation_batch_size or 2 * cfg.batch_size, workers=cfg.workers,
            device=self.device, channels_last=self.channels_last,
            dtype=self.amp_dtype if (self.amp_dtype is not None and cuda) else torch.float32,
            loader=self.loader_kind, aug=cfg.aug, rank=self.dist.rank, world_size=self.dist.world_size,
            seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
            train_subset=cfg.train_subset, train_subset_seed=cfg.train_subset_seed, val_split=cfg.val_split,
        )
        self.train_loader, self.val_loader, self.info = build_loaders(self.spec)
        num_classes = self.info.num_classes
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise ConfigError(f"--num-classes is {cfg.num_classes} but the data has {num_classes} classes")
        self.num_classes = num_classes

        torch.manual_seed(cfg.seed)
        model = create_policy_model(cfg, num_classes)
        if cfg.sync_bn and self.dist.is_distributed:
            from automix_fast.engine.distributed import convert_sync_batchnorm

            model = convert_sync_batchnorm(model, self.device)  # a CPU version where torch's needs a GPU
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mixer = wrap_policy(cfg, model, mix_stage=self.mix_stage, rank=self.dist.rank).to(self.device)
        if cfg.torchcompile:
            self.model.compile()
            if self.mixer.momentum_encoder is not None:
                self.mixer.momentum_encoder.compile()
        groups = self.mixer.param_groups(
            cfg.lr, cfg.weight_decay, cfg.min_lr, mix_block_lr=cfg.mix_block_lr, mix_block_min_lr=cfg.mix_block_min_lr,
            mix_block_weight_decay=cfg.mix_block_weight_decay, mix_block_momentum=cfg.mix_block_momentum,
            decay_norm_and_bias=cfg.decay_norm_and_bias,
        )
        self.optimizer = build_optimizer(groups, cfg.opt, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, device=self.device)
        self.steps_per_epoch = optimizer_steps_per_epoch(cfg, len(self.train_loader))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_epochs, self.warmup_note = resolve_warmup_epochs(cfg.warmup_epochs, cfg.epochs)
        self.schedule = build_schedule(
            cfg.sched, [g["lr"] for g in groups], total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            warmup_steps=int(self.warmup_epochs * self.steps_per_epoch), floors=[g["min_lr"] for g in groups],
            decay_milestones=cfg.decay_epochs or (), warmup_lr=cfg.warmup_lr, on_updates=cfg.sched_on_updates,
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.guard = StepGuard(self.device)
        self.start_epoch, self.start_batch, self.history = 0, 0, []
        self.best = None
        self.last_good = None  # (path, next_epoch, next_batch) of the newest checkpoint written

    # ------------------------------------------------------------------ state
    def state(self, next_epoch: int, next_batch: int) -> dict:
        from automix_fast.engine.checkpoint import rng_state

        return {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "num_classes": self.num_classes,
            "classes": list(self.info.classes),
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "mixer": self.mixer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": int(self.guard.skipped.item()),
            "rng": rng_state(),
            "history": json.dumps(self.history),
        }

    def load_state(self, path, state: dict) -> None:
        from automix_fast.engine.checkpoint import set_rng_state

        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an automix-fast training checkpoint")
        if state.get("model_name") != self.cfg.model or state.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"{path} holds model '{state.get('model_name')}' with num_classes {state.get('num_classes')}, "
                f"but this run has model '{self.cfg.model}' with num_classes {self.num_classes}"
            )
        changed = config_changes(state.get("config", {}), self.cfg)
        if changed and not self.cfg.allow_config_change:
            old = state["config"]
            details = ", ".join(f"{flag_name(k)}: {old[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise ConfigError(f"resuming {path} with a changed config ({details}); pass --allow-config-change to accept")
        try:
            self.mixer.load_state_dict(state["mixer"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not match this model: {str(e).splitlines()[0]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.guard.skipped.fill_(state.get("skipped_steps", 0))
        set_rng_state(state["rng"])
        self.start_epoch, self.start_batch = state["next_epoch"], state["next_batch"]
        self.history = json.loads(state.get("history", "[]"))

    def _save(self, manager, state: dict, *, epoch: int | None = None, metric=None, mid_epoch: bool = False) -> None:
        """Rank 0 writes the checkpoint(s), never one holding NaN/inf (every rank checks, so all
        ranks raise together). With the debug hook set, every rank also dumps its own state."""
        bad = first_nonfinite(self.mixer)
        if bad is not None:
            raise NonFiniteError(f"'{bad}' holds NaN/inf values; "
                                 "not writing it to a checkpoint")
        if self.is_main:
            if mid_epoch:
                manager.save_last(state)
            else:
                manager.save(state, epoch, metric=metric)
            self.last_good = (self.run_dir / "last.pt", state["next_epoch"], state["next_batch"])
        debug_dir = os.environ.get(RANK_STATE_ENV)
        if debug_dir:
            Path(debug_dir).mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.mixer.state_dict().items()},
                       Path(debug_dir) / f"rank{self.dist.rank}.pt")

    def _last_good(self) -> str:
        if self.last_good is None:
            return f"no checkpoint was written in {self.run_dir}"
        path, epoch, batch = self.last_good
        where = f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
        return f"the last good checkpoint is {path} ({where})"

    def resolved(self) -> dict:
        """What the null/auto fields of the config became on this machine (for config.yaml)."""
        from automix_fast import ops
        from automix_fast.data.torch_loader import resolve_aug

        return {
            "dataset": self.info.kind, "loader": self.loader_kind, "device": self.device.type,
            "img_size": self.spec.img_size, "aug": resolve_aug(self.spec), "num_classes": self.num_classes,
            "validation_batch_size": self.spec.eval_batch_size, "mix_stage": self.mix_stage,
            "mix_alpha": self._mix_alpha(), "amp": self.amp_dtype is not None,
            "channels_last": self.channels_last,
            "kernel_backend": ops.resolve_backend(self.cfg.kernel_backend, self.device),
            "warmup_epochs": self.warmup_epochs,
        }

    def _mix_alpha(self) -> float | None:
        """The alpha --mix-alpha null resolved to (None where timm's --mixup/--cutmix set them)."""
        if hasattr(self.mixer, "alpha"):
            return self.mixer.alpha
        if self.cfg.mix in ("mixup", "cutmix") and self.cfg.mixup is None and self.cfg.cutmix is None:
            return getattr(self.mixer, f"{self.cfg.mix}_alpha", None)
        return None

    def header(self) -> str:
        cfg, amp = self.cfg, self.amp_dtype
        return (
            f"automix-fast: {self.mixer.label} on {self.info.kind} ({self.info.num_train} train / {self.info.num_val} val, "
            f"{self.num_classes} classes, {self.spec.img_size}px), {cfg.model}, {self.device.type}"
            f"{' x' + str(self.dist.world_size) if self.dist.is_distributed else ''}, loader {self.loader_kind}, "
            f"amp {str(amp).replace('torch.', '') if amp is not None else 'off'}, "
            f"{'channels-last' if self.channels_last else 'NCHW'}, "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x {self.steps_per_epoch} steps"
        )

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        from automix_fast.engine.checkpoint import CheckpointManager
        from automix_fast.engine.metrics import MetricLogger, ProgressLine
        from automix_fast.engine.summary_csv import write_summary_csv
        from automix_fast.engine.train import evaluate, train_one_epoch
        from automix_fast.engine.train_options import loop_options

        cfg = self.cfg
        found = self.resume_from
        if found is not None:
            path, state = found
            self.load_state(path, state)
            self.last_good = (path, self.start_epoch, self.start_batch)
            if self.forked:
                self.log(f"forked from {path} (left as it is) at epoch {self.start_epoch + 1}, batch {self.start_batch}")
            else:
                self.log(f"resumed from {path} at epoch {self.start_epoch + 1}, batch {self.start_batch}")
        elif cfg.initial_checkpoint:  # timm's --initial-checkpoint: a fresh start from its weights only
            from automix_fast.engine.initial_checkpoint import load_initial_checkpoint

            load_initial_checkpoint(self.mixer, cfg.initial_checkpoint, cfg.model, self.num_classes)
            self.log(f"model weights from {cfg.initial_checkpoint}")
        if self.is_main:
            if found is None:  # a new run: its own folder (a suffixed default name when taken)
                self.run_dir = rundir.claim(self.run_dir, named=bool(cfg.experiment))
            elif self.forked:  # continuing elsewhere: into a new folder (or one that holds no run)
                rundir.claim(self.run_dir, named=True)
            else:  # steps logged after that checkpoint (a kill) are logged again from here
                rundir.trim_metrics(self.run_dir, self.start_epoch * self.steps_per_epoch + self.start_batch)
            save_config(cfg, str(self.run_dir / rundir.CONFIG_FILE), self.resolved())
        manager = CheckpointManager(self.run_dir, keep_recent=cfg.checkpoint_hist)
        if self.forked:  # the fork's own first checkpoint; its best.pt compares its own epochs
            self._save(manager, self.state(self.start_epoch, self.start_batch), mid_epoch=True)
        elif found is not None:
            manager.restore(found[1])
        logger = MetricLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log_tensorboard)
        bad_files = self.info.bad_files  # files that fail to decode mid-run: automix_fast/data/bad_files.py
        bad_files.start_run(self.run_dir)  # a resumed run plans around the files its folder lists
        self.log(self.header())
        terms = self.mixer.summed_terms
        if terms:
            self.log(f"loss shown = {' + '.join(terms)} (each logged in metrics.jsonl)")
        if self.warmup_note and not self.quiet:
            print(self.warmup_note, file=sys.stderr if self.warmup_note.startswith("warning") else sys.stdout, flush=True)
        self.log(f"run folder: {self.run_dir}")
        from automix_fast.engine.distributed import average_bn_stats, flat_allreduce_mean

        grad_sync = flat_allreduce_mean if self.dist.is_distributed else None
        reduce = None
        if self.dist.is_distributed:
            from automix_fast.engine.distributed import all_reduce_sum

            reduce = all_reduce_sum
        stop = StopFlag().install()
        # Under torchrun train_one_epoch agrees on `stop` across ranks at its log steps (inside
        # the metrics collective); epoch ends agree with one any_rank.
        should_stop = stop
        t_run = time.perf_counter()
        eval_result = next((h["eval"] for h in reversed(self.history) if h["eval"]), {})
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                skip = self.start_batch if epoch == self.start_epoch else 0
                progress = ProgressLine(epoch + 1, cfg.epochs, self.steps_per_epoch, log_interval=cfg.log_interval,
                                        enabled=not self.quiet, start_step=skip,
                                        world_size=self.dist.world_size, terms=terms)

                def on_log(i, values, epoch=epoch):
                    logger.log("train", values, epoch=epoch + 1, step=epoch * self.steps_per_epoch + i)

                try:
                    result = train_one_epoch(
                        self.mixer, self.train_loader, self.optimizer, self.schedule, epoch=epoch,
                        start_step=epoch * self.steps_per_epoch, total_steps=self.total_steps, amp_dtype=self.amp_dtype,
                        guard=self.guard, scaler=self.scaler, grad_sync=grad_sync, skip_batches=skip,
                        log_interval=cfg.log_interval, on_log=on_log, progress=progress, should_stop=should_stop,
                        max_bad_steps=cfg.max_bad_steps, metric_mean=grad_sync, world_size=self.dist.world_size,
                        **loop_options(cfg),
                    )
                finally:
                    progress.close()
                if self.dist.is_distributed:
                    average_bn_stats(self.mixer)
                if result.stopped and skip + result.steps < self.steps_per_epoch:
                    bad_files.end_epoch(logger, epoch=epoch + 1, step=epoch * self.steps_per_epoch + skip + result.steps,
                                        run_dir=self.run_dir, write=self.is_main, distributed=self.dist.is_distributed)
                    self._save(manager, self.state(epoch, skip + result.steps), mid_epoch=True)
                    self.log(f"stopped by {stop.name}; checkpoint written to {self.run_dir / 'last.pt'}")
                    self.log(f"continue with: {rundir.resume_command(self.run_dir, self.dist.world_size)}")
                    return {"stopped": True, "run_dir": str(self.run_dir), "signal": stop.signal}
                # --eval-interval: long runs on a CPU evaluate every k-th epoch (and always the last).
                evaluating = (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs
                epoch_eval = (evaluate(self.mixer, self.val_loader, amp_dtype=self.amp_dtype, device=self.device,
                                       reduce=reduce) if evaluating else {})
                eval_result = epoch_eval or eval_result
                bad_files.end_epoch(logger, epoch=epoch + 1, step=(epoch + 1) * self.steps_per_epoch, run_dir=self.run_dir,
                                    write=self.is_main, distributed=self.dist.is_distributed)
                main_head = next(iter(self.mixer.eval_heads()))
                self.history.append({"epoch": epoch + 1, "train": result.means, "eval": epoch_eval})
                if self.is_main:
                    write_summary_csv(self.run_dir / "summary.csv", self.history, list(self.mixer.eval_heads()))
                if epoch_eval:
                    logger.log("eval", epoch_eval, epoch=epoch + 1, step=(epoch + 1) * self.steps_per_epoch)
                    self.log("  eval " + "  ".join(
                        f"{h} {epoch_eval[h + '_top1']:.2f}/{epoch_eval[h + '_top5']:.2f}" for h in self.mixer.eval_heads()
                    ) + "  (top-1/top-5 %)")
                self._save(manager, self.state(epoch + 1, 0), epoch=epoch + 1,
                           metric=epoch_eval[main_head + "_top1"] if epoch_eval else None)
                bad_files.stop_after_epoch()  # --skip-bad-images off: stop now, the checkpoint written
                if self.dist.is_distributed:
                    from automix_fast.engine.distributed import any_rank

                    stopping = any_rank(stop(), self.device)
                else:
                    stopping = stop()
                if stopping and epoch + 1 < cfg.epochs:  # after the last epoch: the run finishes
                    self.log(f"stopped by {stop.name} after epoch {epoch + 1}; checkpoint written to {self.run_dir / 'last.pt'}")
                    self.log(f"continue with: {rundir.resume_command(self.run_dir, self.dist.world_size)}")
                    return {"stopped": True, "run_dir": str(self.run_dir), "signal": stop.signal}
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._last_good()}") from None
        except OutputError as e:
            raise OutputError(f"{e}; {self._last_good()}") from None
        finally:
            stop.restore()
            logger.close()
        summary = {
            "run_dir": str(self.run_dir),
            "mix": cfg.mix,
            "model": cfg.model,
            "epochs": cfg.epochs,
            "eval": eval_result,
            "heads": list(self.mixer.eval_heads()),
            "skipped_steps": int(self.guard.skipped.item()),
            "train_seconds": time.perf_counter() - t_run,
            **mask_summary(self.history),
            "stopped": False,
            "is_main": self.is_main,
        }
        if self.is_main:
            rundir.write_json(self.run_dir / rundir.SUMMARY_FILE, summary, "summary")
            if cfg.visualize and cfg.mix == "automix":
                from automix_fast.visualize import write_mix_grid

                png, _ = write_mix_grid(self.mixer, self.val_loader, self.run_dir / "mixes.png", self.spec,
                                        classes=self.info.classes)
                summary["mixes_png"] = str(png)
        summary["signal"] = stop.signal  # a SIGTERM/SIGINT that came after the last step (not in summary.json)
        if self.dist.is_distributed:
            from automix_fast.engine.distributed import barrier

            barrier()  # no rank leaves (and tears down gloo/NCCL) while another is still writing
        return summary
