"""Mixing policies: vanilla | mixup | cutmix | automix, all behind one `Mixer` interface."""
from __future__ import annotations

from automix_fast.errors import ConfigError

from .base import Mixer, StepRandom, mix_cross_entropy

MIXERS = ("vanilla", "mixup", "cutmix", "automix")

__all__ = ["MIXERS", "Mixer", "StepRandom", "build_mixer", "mix_cross_entropy"]


def build_mixer(name: str, model, **settings) -> Mixer:
    """The policy `name` around `model`; settings the policy does not take are ignored."""
    from .automix import AutoMix
    from .baselines import CutMix, Mixup, Vanilla

    classes = {"vanilla": Vanilla, "mixup": Mixup, "cutmix": CutMix, "automix": AutoMix}
    if name not in classes:
        raise ConfigError(f"unknown mix policy {name!r}; choose from: {', '.join(MIXERS)}")
    cls = classes[name]
    common = {k: settings[k] for k in ("seed", "rank", "smoothing") if k in settings}
    own = {}
    if name in ("mixup", "cutmix", "automix") and settings.get("alpha") is not None:
        own["alpha"] = settings["alpha"]
    if name == "automix":
        keys = ("momentum_base", "momentum_end", "mask_loss_weight", "mask_loss_anneal", "mask_margin",
                "lam_margin", "lam_concat", "mask_mode", "mix_stage", "kernel_backend", "k_full_forward",
                "mix_shuffle_no_repeat")
        own.update({k: settings[k] for k in keys if settings.get(k) is not None})
    return cls(model, **common, **own)
