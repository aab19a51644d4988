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
import signal
import sys
import time
from pathlib import Path

import torch

from automix_fast.config import TrainConfig, config_changes, save_config
from automix_fast.engine.train import NonFiniteError
from automix_fast.errors import CheckpointError, ConfigError, UserError

FORMAT = "automix-fast/1"
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a signal (DDP only)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at each step boundary. A second SIGINT aborts."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        # Under torchrun another rank may have been signalled first: this one still stops with it.
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def resolve_loader(name: str) -> str:
    if name != "auto":
        return name
    from automix_fast.data.dali import dali_available

    return "dali" if dali_available() else "torch"


def run_dir_for(cfg: TrainConfig) -> Path:
    if cfg.experiment:
        return Path(cfg.output) / cfg.experiment
    if cfg.resume and cfg.resume != "auto":
        return Path(cfg.resume).resolve().parent
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{cfg.mix}"
    return Path(cfg.output) / name


def flat_allreduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in one collective (gradients, BN statistics)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def average_bn_stats(module: torch.nn.Module) -> None:
    bufs = [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
    flat_allreduce_mean(bufs)


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

    def __init__(self, cfg: TrainConfig, *, quiet: bool = False):
        from automix_fast.data import DataSpec, build_loaders
        from automix_fast.engine.distributed import init_distributed
        from automix_fast.engine.optim import build_optimizer
        from automix_fast.engine.schedule import build_schedule
        from automix_fast.engine.train import StepGuard
        from automix_fast.mixing import build_mixer
        from automix_fast.models import create_model

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.quiet = quiet or not self.is_main
        if cfg.deterministic:
            if self.device.type == "cuda":  # deterministic cuBLAS needs this before its first call
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        cuda = self.device.type == "cuda"
        use_amp = cfg.amp if cfg.amp is not None else cuda
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype] if use_amp else None
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
        from automix_fast import ops

        try:  # --kernel-backend triton without CUDA or TRITON_INTERPRET: say so before any data work
            ops.resolve_backend(cfg.kernel_backend, self.device)
        except ValueError as e:
            raise ConfigError(f"config field 'kernel_backend': {e}") from None

        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
        probe = create_model(cfg.model, num_classes=2)  # unknown model names fail before any data work
        img_size = cfg.img_size or probe.default_img_size
        self.mix_stage = cfg.mix_stage or probe.mix_stage
        if self.mix_stage > probe.num_stages:
            raise ConfigError(f"config field 'mix_stage' must be at most {probe.num_stages} for {cfg.model}, got {self.mix_stage}")
        del probe
        self.loader_kind = resolve_loader(cfg.loader)
        self.spec = DataSpec(
            dataset=cfg.dataset, data_dir=cfg.data_dir, img_size=img_size, batch_size=cfg.batch_size,
            eval_batch_size=cfg.validation_batch_size or 2 * cfg.batch_size, workers=cfg.workers,
            device=self.device, channels_last=self.channels_last,
            dtype=self.amp_dtype if (self.amp_dtype is not None and cuda) else torch.float32,
            loader=self.loader_kind, aug=cfg.aug, rank=self.dist.rank, world_size=self.dist.world_size,
            seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
        )
        self.train_loader, self.val_loader, self.info = build_loaders(self.spec)
        if len(self.train_loader) == 0:
            raise UserError(
                f"batch size {cfg.batch_size} x {self.dist.world_size} process(es) is larger than the "
                f"{self.info.num_train} training images: no full batch to train on"
            )
        num_classes = self.info.num_classes
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise ConfigError(f"config field 'num_classes' is {cfg.num_classes} but the data has {num_classes} classes")
        self.num_classes = num_classes

        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=num_classes, mix_head=cfg.mix == "automix")
        if cfg.sync_bn and self.dist.is_distributed:
            from automix_fast.engine.distributed import convert_sync_batchnorm

            model = convert_sync_batchnorm(model, self.device)  # a CPU version where torch's needs a GPU
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mixer = build_mixer(
            cfg.mix, model, alpha=cfg.mix_alpha, seed=cfg.seed, rank=self.dist.rank, smoothing=cfg.smoothing,
            momentum_base=cfg.encoder_momentum, momentum_end=cfg.encoder_momentum_end,
            mask_loss_weight=cfg.mask_loss_weight, mask_loss_anneal=cfg.mask_loss_anneal,
            mask_margin=cfg.mask_margin, lam_margin=cfg.lam_margin, lam_concat=cfg.lam_concat,
            mask_mode=cfg.mask_mode, mix_stage=self.mix_stage, kernel_backend=cfg.kernel_backend,
        ).to(self.device)
        if cfg.torchcompile:
            self.model.compile()
            if hasattr(self.mixer, "momentum_encoder"):
                self.mixer.momentum_encoder.compile()
        groups = self.mixer.param_groups(
            cfg.lr, cfg.weight_decay, cfg.min_lr, mix_block_lr=cfg.mix_block_lr, mix_block_min_lr=cfg.mix_block_min_lr,
            mix_block_weight_decay=cfg.mix_block_weight_decay,
        )
        self.optimizer = build_optimizer(groups, cfg.opt, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, device=self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.schedule = build_schedule(
            cfg.sched, [g["lr"] for g in groups], total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            warmup_steps=int(cfg.warmup_epochs * self.steps_per_epoch), floors=[g["min_lr"] for g in groups],
            decay_milestones=cfg.decay_epochs or (), warmup_lr=cfg.warmup_lr,
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.guard = StepGuard(self.device)
        self.run_dir = run_dir_for(cfg)
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
            details = ", ".join(f"{k}: {old[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed)
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

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        from automix_fast.engine.checkpoint import CheckpointManager, resolve_resume
        from automix_fast.engine.metrics import MetricLogger, ProgressLine
        from automix_fast.engine.train import evaluate, train_one_epoch

        cfg = self.cfg
        if cfg.resume == "auto" and not cfg.experiment:
            raise ConfigError("--resume auto needs --experiment NAME (the run folder to continue)")
        manager = CheckpointManager(self.run_dir, keep_recent=cfg.checkpoint_hist)
        found = resolve_resume(cfg.resume, self.run_dir) if cfg.resume else None
        if found is not None:
            path, state = found
            self.load_state(path, state)
            manager.restore(state)
            self.last_good = (path, self.start_epoch, self.start_batch)
            self.log(f"resumed from {path} at epoch {self.start_epoch + 1}, batch {self.start_batch}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, str(self.run_dir / "config.yaml"))
        logger = MetricLogger(self.run_dir, enabled=self.is_main)
        bad_files = self.info.bad_files  # files that fail to decode mid-run: automix_fast/data/bad_files.py
        bad_files.start_run(self.run_dir)  # a resumed run plans around the files its folder lists
        self.log(
            f"automix-fast: {cfg.mix} on {self.info.kind} ({self.info.num_train} train / {self.info.num_val} val, "
            f"{self.num_classes} classes, {self.spec.img_size}px), {cfg.model}, {self.device.type}"
            f"{' x' + str(self.dist.world_size) if self.dist.is_distributed else ''}, loader {self.loader_kind}, "
            f"amp {self.amp_dtype and str(self.amp_dtype).replace('torch.', '')}, "
            f"{'channels-last' if self.channels_last else 'NCHW'}, {cfg.epochs} epochs x {self.steps_per_epoch} steps"
        )
        self.log(f"run folder: {self.run_dir}")
        grad_sync = flat_allreduce_mean if self.dist.is_distributed else None
        reduce = None
        if self.dist.is_distributed:
            from automix_fast.engine.distributed import all_reduce_sum

            reduce = all_reduce_sum
        stop = StopFlag().install()
        if self.dist.is_distributed:
            from automix_fast.engine.distributed import any_rank

            calls = [0]

            def should_stop(every: int = STOP_CHECK_EVERY) -> bool:
                """All ranks stop at the same step boundary. Agreeing costs a collective and a host
                sync, so it happens every `every` calls; every rank makes the same calls (one per
                step, one per epoch end with every=1), so all ranks agree on when to look."""
                calls[0] += 1
                return calls[0] % every == 0 and any_rank(stop(), self.device)
        else:
            should_stop = stop
        t_run = time.perf_counter()
        eval_result = self.history[-1]["eval"] if self.history else {}
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                skip = self.start_batch if epoch == self.start_epoch else 0
                progress = ProgressLine(epoch + 1, cfg.epochs, self.steps_per_epoch, log_interval=cfg.log_interval,
                                        enabled=not self.quiet)
                progress.step = skip

                def on_log(i, values, epoch=epoch):
                    logger.log("train", values, epoch=epoch + 1, step=epoch * self.steps_per_epoch + i)

                try:
                    result = train_one_epoch(
                        self.mixer, self.train_loader, self.optimizer, self.schedule, epoch=epoch,
                        start_step=epoch * self.steps_per_epoch, total_steps=self.total_steps, amp_dtype=self.amp_dtype,
                        guard=self.guard, scaler=self.scaler, grad_sync=grad_sync, skip_batches=skip,
                        log_interval=cfg.log_interval, on_log=on_log, progress=progress, should_stop=should_stop,
                        max_bad_steps=cfg.max_bad_steps, metric_mean=grad_sync,
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
                    self.log(f"continue with: automix-fast train --resume auto --output {cfg.output} --experiment {self.run_dir.name}")
                    return {"stopped": True, "run_dir": str(self.run_dir)}
                eval_result = evaluate(self.mixer, self.val_loader, amp_dtype=self.amp_dtype, device=self.device, reduce=reduce)
                bad_files.end_epoch(logger, epoch=epoch + 1, step=(epoch + 1) * self.steps_per_epoch, run_dir=self.run_dir,
                                    write=self.is_main, distributed=self.dist.is_distributed)
                main_head = next(iter(self.mixer.eval_heads()))
                self.history.append({"epoch": epoch + 1, "train": result.means, "eval": eval_result})
                logger.log("eval", eval_result, epoch=epoch + 1, step=(epoch + 1) * self.steps_per_epoch)
                self.log("  eval " + "  ".join(
                    f"{h} {eval_result[h + '_top1']:.2f}/{eval_result[h + '_top5']:.2f}" for h in self.mixer.eval_heads()
                ) + "  (top-1/top-5 %)")
                self._save(manager, self.state(epoch + 1, 0), epoch=epoch + 1, metric=eval_result[main_head + "_top1"])
                bad_files.stop_after_epoch()  # --skip-bad-images off: stop now, the checkpoint written
                if (should_stop(every=1) if self.dist.is_distributed else should_stop()):
                    self.log(f"stopped by {stop.name} after epoch {epoch + 1}; continue with --resume auto")
                    return {"stopped": True, "run_dir": str(self.run_dir)}
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._last_good()}") from None
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
            "stopped": False,
            "is_main": self.is_main,
        }
        if self.is_main:
            with open(self.run_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
            if cfg.visualize and cfg.mix == "automix":
                from automix_fast.visualize import write_mix_grid

                png = write_mix_grid(self.mixer, self.val_loader, self.run_dir / "mixes.png", self.spec)
                summary["mixes_png"] = str(png)
        if self.dist.is_distributed:
            from automix_fast.engine.distributed import barrier

            barrier()  # no rank leaves (and tears down gloo/NCCL) while another is still writing
        return summary
