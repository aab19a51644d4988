"""What the net, mixing and optim sections hand to the model builder, the
mixing policy and the training loop; the Trainer passes these on unchanged."""
from __future__ import annotations

from automix_fast.engine.grad_clip import grad_clipper
from automix_fast.engine.train import steps_per_epoch
from automix_fast.errors import ConfigError
from automix_fast.models import builder_options


def model_options(net) -> dict:
    """Builder options of the `net` section: `drop_path_rate` for --drop-path > 0 (models with
    residual blocks only)."""
    if not net.drop_path:
        return {}
    if "drop_path_rate" not in builder_options(net.model):
        raise ConfigError(f"--drop-path {net.drop_path:g} needs a model with residual blocks (the ResNet family, "
                          f"WRN); --model {net.model} has none")
    return {"drop_path_rate": net.drop_path}


def mixer_options(mixing) -> dict:
    """build_mixer settings of the `mixing` section: timm's mixup/cutmix alphas and
    probabilities, the model EMA decay."""
    return {"mixup": mixing.mixup, "cutmix": mixing.cutmix, "mix_prob": mixing.mixup_prob,
            "switch_prob": mixing.mixup_switch_prob, "mixup_mode": mixing.mixup_mode,
            "cutmix_minmax": mixing.cutmix_minmax, "model_ema_warmup": mixing.model_ema_warmup,
            "model_ema_decay": mixing.model_ema_decay if mixing.model_ema else None}


def automix_departures(mixing) -> list[str]:
    """The named alternatives to the official AutoMix step that the `mixing` section turns on,
    each as its flag and what it changes (empty for the official step or another policy)."""
    if mixing.mix != "automix":
        return []
    departures = []
    if not mixing.k_full_forward:
        departures.append("--no-k-full-forward (k stops at the mix stage on the clean batch)")
    if mixing.mix_block_every != 1:
        departures.append(f"--mix-block-every {mixing.mix_block_every} (the Mix Block trains on one step in "
                          f"{mixing.mix_block_every})")
    if mixing.mix_block_init != "official":
        departures.append(f"--mix-block-init {mixing.mix_block_init}")
    if mixing.q_batched:
        departures.append("--q-batched (q's two passes as one: BatchNorm statistics over both batches)")
    return departures


def loop_options(optim, heads=()) -> dict:
    """train_one_epoch arguments of the `optim` section: micro-batches per step and the gradient
    clipper (`heads`: the classifier heads' parameters, which --clip-mode agc leaves out)."""
    return {"accum_steps": optim.grad_accum_steps, "clip": grad_clipper(optim.clip_grad, optim.clip_mode, heads)}


def optimizer_steps_per_epoch(optim, loader_batches: int) -> int:
    """Optimizer steps per epoch with the `optim` section's --grad-accum-steps (the last one takes
    the micro-batches left); the train loader has at least one batch (data.shards.check_full_batch)."""
    return steps_per_epoch(loader_batches, optim.grad_accum_steps)
