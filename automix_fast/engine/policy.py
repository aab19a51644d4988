"""The network and its mixing policy, built from a config: shared by train, eval and export,
so a checkpoint's `mixer` state always loads into what these build."""
from __future__ import annotations


def create_policy_model(cfg, num_classes: int):
    """The online network for `cfg` (with the mixed-label head when the policy is AutoMix)."""
    from automix_fast.models import create_model

    return create_model(cfg.model, num_classes=num_classes, mix_head=cfg.mix == "automix")


def wrap_policy(cfg, model, *, mix_stage: int | None = None, rank: int = 0):
    """The mixing policy `cfg.mix` around `model` (AutoMix adds the Mix Block and momentum encoder)."""
    from automix_fast.mixing import build_mixer

    return build_mixer(
        cfg.mix, model, alpha=cfg.mix_alpha, seed=cfg.seed, rank=rank, smoothing=cfg.smoothing,
        momentum_base=cfg.encoder_momentum, momentum_end=cfg.encoder_momentum_end,
        mask_loss_weight=cfg.mask_loss_weight, mask_loss_anneal=cfg.mask_loss_anneal,
        mask_margin=cfg.mask_margin, lam_margin=cfg.lam_margin, lam_concat=cfg.lam_concat,
        mask_mode=cfg.mask_mode, mix_stage=mix_stage or cfg.mix_stage or model.mix_stage,
        kernel_backend=cfg.kernel_backend,
    )
