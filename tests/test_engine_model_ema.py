"""engine/model_ema.py: one EMA (timm's ModelEmaV3 shape) for --model-ema and AutoMix's momentum encoder."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from automix_fast.engine.model_ema import ModelEma, ema_decay, ema_update
from automix_fast.mixing import build_mixer
from automix_fast.mixing.automix import encoder_momentum
from automix_fast.models import create_model


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    net(torch.randn(2, 3, 4, 4))  # BN statistics and batch counter move away from their start
    return net


def test_first_update_copies_then_the_decay_applies_to_parameters_and_float_buffers():
    model = _net(0)
    ema = ModelEma(model, 0.9)
    assert ema.module is not model and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.get_decay() == 0.9 and ema.get_decay(1) == 0.0 and ema.get_decay(2) == 0.9
    other = _net(1)
    ema.update(other, step=1)  # decay 0: the average takes the model's weights
    for k, v in other.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model = _net(2)
    ema.update(model, step=2)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * before[k] + 0.1 * v)
        else:
            assert torch.equal(ema.module.state_dict()[k], v)


def test_warmup_is_timms_get_decay():
    ema = ModelEma(_net(0), 0.9998, warmup=True)
    for t in (1, 5, 100):
        assert ema.get_decay(t + 1) == pytest.approx(min(0.9998, 1 - (1 + t) ** (-2 / 3)))


def test_exclude_buffers_averages_parameters_only_and_set_copies_everything():
    model = _net(0)
    ema = ModelEma(model, 0.5, exclude_buffers=True, module=_net(1))
    buffers = {k: v.clone() for k, v in ema.module.named_buffers()}
    params = {k: v.clone() for k, v in ema.module.named_parameters()}
    ema.update(model, decay=0.75)  # an explicit decay replaces get_decay
    for k, v in model.named_parameters():
        torch.testing.assert_close(dict(ema.module.named_parameters())[k], 0.75 * params[k] + 0.25 * v)
    for k, v in ema.module.named_buffers():
        assert torch.equal(v, buffers[k])
    ema.set(model)
    for k, v in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v)


def test_momentum_encoder_and_model_ema_are_the_same_class():
    torch.manual_seed(0)
    automix = build_mixer("automix", create_model("tinynet", num_classes=3, mix_head=True), kernel_backend="torch")
    assert isinstance(automix.k_ema, ModelEma) and automix.k_ema.module is automix.momentum_encoder
    assert automix.k_ema.exclude_buffers
    with torch.no_grad():
        for p in automix.model.parameters():
            p.add_(1.0)
    k_before = {k: v.clone() for k, v in automix.momentum_encoder.state_dict().items()}
    automix.after_step(3, 10)
    m = encoder_momentum(3, 10)
    q = dict(automix.model.named_parameters())
    for k, v in automix.momentum_encoder.named_parameters():
        torch.testing.assert_close(v, m * k_before[k] + (1 - m) * q[k])
    for k, v in automix.momentum_encoder.named_buffers():
        assert torch.equal(v, k_before[k])  # k's own BN statistics
    vanilla = build_mixer("vanilla", create_model("tinynet", num_classes=3), model_ema_decay=0.5)
    assert isinstance(vanilla.ema, ModelEma) and vanilla.ema.module is vanilla.model_ema
    assert not vanilla.ema.exclude_buffers


def test_ema_update_is_timm_formula_and_copies_integer_buffers():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].num_batches_tracked.fill_(7)
    model[1].running_mean.normal_()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.9)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[k], 0.9 * before[k] + 0.1 * v)
        else:
            assert torch.equal(ema.state_dict()[k], v)


def test_ema_decay_is_timms_get_decay():
    """timm's ModelEmaV3.get_decay(step=num_updates), warmup_gamma 1, warmup_power 2/3."""
    assert ema_decay(0.9998, 1) == 0.0 and ema_decay(0.9998, 1, warmup=True) == 0.0
    assert ema_decay(0.9998, 2) == 0.9998
    for t in (1, 10, 1000):
        assert ema_decay(0.9998, t + 1, warmup=True) == pytest.approx(1 - (1 + t) ** (-2 / 3))
    assert ema_decay(0.9998, 10**9, warmup=True) == 0.9998  # capped at the decay
    mixer = build_mixer("mixup", create_model("tinynet", num_classes=3), mixup=1.0, model_ema_decay=0.99,
                        model_ema_warmup=True)
    assert "warm-up" in mixer.label
    w = mixer.model.head_one.weight
    mixer.after_step(0, 10)
    with torch.no_grad():
        w.add_(1.0)
    before = mixer.model_ema.head_one.weight.clone()
    mixer.after_step(1, 10)  # decay 1 - 2^(-2/3) = 0.37, not 0.99
    d = 1 - 2 ** (-2 / 3)
    torch.testing.assert_close(mixer.model_ema.head_one.weight, d * before + (1 - d) * w.detach())
