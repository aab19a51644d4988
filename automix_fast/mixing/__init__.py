"""Mixing policies: vanilla | mixup | cutmix | automix, all behind one `Mixer` interface."""
from __future__ import annotations

from automix_fast.config.sections import MIXES
from automix_fast.errors import ConfigError

from .automix import AutoMix
from .base import Mixer, StepRandom, mix_cross_entropy
from .baselines import MixupCutmix, Vanilla, baseline_alphas

MIXERS = MIXES

__all__ = ["MIXERS", "Mixer", "StepRandom", "build_mixer", "mix_cross_entropy"]


def build_mixer(name: str, model, **settings) -> Mixer:
    """The policy `name` around `model`; settings the policy does not take are ignored.

    mixup and cutmix are one policy (timm's Mixup): `alpha` is the named one's alpha unless
    `mixup`/`cutmix` (timm's flags) give both, with `mix_prob`, `switch_prob`, `mixup_mode` and
    `cutmix_minmax`. `model_ema_decay` (not None) adds an EMA copy of the model (the baselines
    only), warmed up as timm's with `model_ema_warmup`.
    """
    if name not in MIXERS:
        raise ConfigError(f"unknown mix policy {name!r}; choose from: {', '.join(MIXERS)}")
    common = {k: settings[k] for k in ("seed", "rank", "smoothing") if k in settings}
    if name == "vanilla":
        mixer = Vanilla(model, **common)
    elif name in ("mixup", "cutmix"):
        mixup, cutmix = baseline_alphas(name, settings.get("alpha"), settings.get("mixup"), settings.get("cutmix"))
        extra = {k: settings[v] for k, v in (("prob", "mix_prob"), ("switch_prob", "switch_prob"), ("mode", "mixup_mode"),
                                             ("cutmix_minmax", "cutmix_minmax")) if settings.get(v) is not None}
        mixer = MixupCutmix(model, mixup_alpha=mixup, cutmix_alpha=cutmix, **extra, **common)
    else:
        own = {"alpha": settings["alpha"]} if settings.get("alpha") is not None else {}
        keys = ("momentum_base", "momentum_end", "mask_loss_weight", "mask_loss_anneal", "mask_margin",
                "lam_margin", "lam_concat", "mask_mode", "mix_stage", "kernel_backend", "k_full_forward",
                "mix_shuffle_no_repeat", "mix_block_init", "mix_block_every", "q_batched")
        own.update({k: settings[k] for k in keys if settings.get(k) is not None})
        mixer = AutoMix(model, **common, **own)
    if settings.get("model_ema_decay") is not None:
        mixer.enable_model_ema(settings["model_ema_decay"], warmup=bool(settings.get("model_ema_warmup")))
    return mixer
