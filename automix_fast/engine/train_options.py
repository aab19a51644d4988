"""What timm's training flags (config block "timm's training flags") hand to the model, the
mixing policy and the training loop; the Trainer passes these on unchanged."""
from __future__ import annotations

from automix_fast.engine.grad_clip import grad_clipper
from automix_fast.engine.train import steps_per_epoch
from automix_fast.errors import ConfigError
from automix_fast.models import builder_options


def model_options(cfg) -> dict:
    """Builder options: `drop_path_rate` for --drop-path > 0 (models with residual blocks only)."""
    if not cfg.drop_path:
        return {}
    if "drop_path_rate" not in builder_options(cfg.model):
        raise ConfigError(f"--drop-path {cfg.drop_path:g} needs a model with residual blocks (the ResNet family, "
                          f"WRN); --model {cfg.model} has none")
    return {"drop_path_rate": cfg.drop_path}


def mixer_options(cfg) -> dict:
    """build_mixer settings: timm's mixup/cutmix alphas and probabilities, the model EMA decay."""
    return {"mixup": cfg.mixup, "cutmix": cfg.cutmix, "mix_prob": cfg.mixup_prob, "switch_prob": cfg.mixup_switch_prob,
            "mixup_mode": cfg.mixup_mode, "cutmix_minmax": cfg.cutmix_minmax,
            "model_ema_decay": cfg.model_ema_decay if cfg.model_ema else None, "model_ema_warmup": cfg.model_ema_warmup}


def loop_options(cfg) -> dict:
    """train_one_epoch arguments: micro-batches per step and the gradient clipper."""
    return {"accum_steps": cfg.grad_accum_steps, "clip": grad_clipper(cfg.clip_grad, cfg.clip_mode)}


def optimizer_steps_per_epoch(cfg, loader_batches: int) -> int:
    """Optimizer steps per epoch with --grad-accum-steps (the last one takes the micro-batches left);
    the train loader has at least one batch (data.shards.check_full_batch)."""
    return steps_per_epoch(loader_batches, cfg.grad_accum_steps)
