"""WRN-28-8 as OpenMixup builds it (openmixup/models/backbones/wide_resnet.py): conv biases,
BatchNorm momentum 0.001 and eps 0.001, LeakyReLU(0.1), the shortcut of stages 2 and 3 on the
raw block input (stage 1's on the pre-activated one), no zero-init. Each block is compared with
the official block written out with torch.nn.functional on the block's own parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automix_fast.models import create_model
from automix_fast.models.wrn import PreActBlock, wide_resnet

EPS, MOMENTUM, SLOPE = 1e-3, 1e-3, 0.1


def official_block(block: PreActBlock, x: torch.Tensor, stage: int, training: bool,
                   stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The official BasicBlock: bn1-act, conv1, bn2-act, conv2, plus the input, or plus a 1x1
    conv of the pre-activated input (stage 1, `activate_before_residual`) or of the raw input
    (stages 2 and 3). `stats`: running statistics, updated in place as BatchNorm would."""
    def bn(name, t):
        layer = getattr(block, name)
        return F.batch_norm(t, stats[name + ".mean"], stats[name + ".var"], layer.weight, layer.bias,
                            training=training, momentum=MOMENTUM, eps=EPS)

    pre = F.leaky_relu(bn("bn1", x), SLOPE)
    out = F.conv2d(pre, block.conv1.weight, block.conv1.bias, stride=block.conv1.stride, padding=1)
    out = F.conv2d(F.leaky_relu(bn("bn2", out), SLOPE), block.conv2.weight, block.conv2.bias, padding=1)
    if block.shortcut is None:
        return out + x
    source = pre if stage == 0 else x
    return out + F.conv2d(source, block.shortcut.weight, block.shortcut.bias, stride=block.shortcut.stride)


def running_stats(block: PreActBlock) -> dict[str, torch.Tensor]:
    return {f"{n}.{s}": getattr(getattr(block, n), f"running_{s}").clone() for n in ("bn1", "bn2") for s in ("mean", "var")}


def randomise(model: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics (small variances, where eps shows)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.002 + 0.01 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.Conv2d):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


@pytest.mark.parametrize("training", [False, True])
def test_every_block_is_the_official_block(training):
    torch.manual_seed(0)
    model = wide_resnet(16, 2, 10, stem="cifar")  # WRN-16-2: 2 blocks a stage, the same rules as 28-8
    randomise(model)
    model.train(training)
    x = model.stem(torch.randn(4, 3, 16, 16))
    for stage, blocks in enumerate(model.stages):
        for block in [b for b in blocks if isinstance(b, PreActBlock)]:
            stats = running_stats(block)
            with torch.no_grad():
                want = official_block(block, x, stage, training, stats)
                got = block(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(running_stats(block), stats, atol=1e-7, rtol=1e-6)  # moved 0.001 in training
            x = got


def test_layers_and_init_are_openmixups():
    """BatchNorm(eps=1e-3, momentum=1e-3) and LeakyReLU(0.1) throughout, a bias on every conv
    (zero at init, as mmcv's kaiming_init), BN weight 1 and bias 0, no zero-init: conv2 is
    kaiming-normal like every conv. The backbone has 23,357,792 parameters."""
    for name in ("wrn28_8_cifar", "wrn28_8"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=100)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
        assert len(norms) == 2 * 12 + 1 and all((m.eps, m.momentum) == (EPS, MOMENTUM) for m in norms)
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
        assert acts and all(type(m) is nn.LeakyReLU and m.negative_slope == SLOPE for m in acts)
        assert len(convs) == 1 + 2 * 12 + 3 and all(m.bias is not None and torch.all(m.bias == 0) for m in convs)
        conv2 = model.stages[2][1].conv2.weight  # 512 x 512 x 3 x 3, fan_out 4608
        assert abs(conv2.std().item() / (2.0 / (512 * 9)) ** 0.5 - 1) < 0.02
        backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head"))
        stem_extra = 0 if name.endswith("_cifar") else 16 * 3 * (7 * 7 - 3 * 3)
        assert backbone == 23_357_792 + stem_extra


def test_stage_shortcuts_read_the_raw_input_after_stage_one():
    """Stage 1's first shortcut sees bn1-act(x); stages 2 and 3 see x itself: changing bn1's
    parameters moves stage 1's shortcut output only."""
    torch.manual_seed(0)
    model = wide_resnet(16, 2, 10, stem="cifar").eval()
    x16 = torch.randn(2, 16, 8, 8)
    for stage, cin in ((0, 16), (1, 32), (2, 64)):
        block = model.stages[stage][0]
        x = x16 if stage == 0 else torch.randn(2, cin, 8, 8)
        with torch.no_grad():
            before = block(x) - block.conv2(block.act(block.bn2(block.conv1(block.act(block.bn1(x))))))
            block.bn1.bias.add_(1.0)
            after = block(x) - block.conv2(block.act(block.bn2(block.conv1(block.act(block.bn1(x))))))
        assert torch.allclose(before, after, atol=1e-5) == (stage > 0), stage
