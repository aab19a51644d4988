"""WRN-28-8: the pre-activation wide ResNet of Zagoruyko & Komodakis (2016) as OpenMixup builds
it (openmixup/models/backbones/wide_resnet.py, the network of the official AutoMix WRN-28-8
recipe): 3 stages of 4 blocks, widths 16k/32k/64k with k = 8, a final BN + activation before
pooling, no dropout by default. Its details, each kept here: every conv (stem, blocks,
shortcuts) has a bias; BatchNorm has momentum 0.001 and eps 0.001 (PyTorch's convention: the
running statistics move 0.001 of the way per step); the activation is LeakyReLU(0.1); the 1x1
shortcut of a stage's first block reads the pre-activated input in stage 1 only, the raw input
in stages 2 and 3; no zero-init of the residual branches. The Mix Block reads stage 2 (256
channels, 16x16 at 32 px), as in the official recipe.
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .drop_path import drop_path_or_identity, drop_path_rates
from .registry import register_model
from .stems import CIFAR, DEFAULT_IMG_SIZE, IMAGENET, STEM_NAMES, make_stem

BN_MOMENTUM = 0.001  # PyTorch's meaning: running = (1 - m) * running + m * batch
BN_EPS = 0.001
LEAKY_SLOPE = 0.1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=False)  # not in place: the block input is reused by the shortcut


class PreActBlock(nn.Module):
    """BN-act-conv3x3-BN-act-(dropout)-conv3x3, plus the input. Where the shape changes the
    shortcut is a 1x1 conv, on the pre-activated input when `shortcut_after_act` (the first
    block of the first stage), else on the raw input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0,
                 shortcut_after_act: bool = False):
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)
        self.bn2 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=True)
        self.act = _act()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride=stride, bias=True)
        self.shortcut_after_act = shortcut_after_act
        self.drop_path = drop_path_or_identity(drop_path)  # stochastic depth on the residual branch

    def zero_init_last(self) -> None:
        # Only with zero_init_residual=True (the official WRN does not zero-init). Zero the last
        # conv, not bn2: a zero bn2 gamma feeds the activation 0, whose gradient through gamma
        # would be 0 too, so the block would stay dead; a zero conv2 still gets a gradient.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        pre = self.act(self.bn1(x))
        if self.shortcut is None:
            identity = x
        else:
            identity = self.shortcut(pre if self.shortcut_after_act else x)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act(self.bn2(out))))
        return self.drop_path(out) + identity


def wide_resnet(depth: int, widen: int, num_classes: int, *, stem: str, mix_head: bool = False,
                zero_init_residual: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> Classifier:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    cin, stages = 16, []
    rates = iter(drop_path_rates(drop_path_rate, 3 * n))  # timm's linear rule over all blocks
    for i, w in enumerate(widths):
        blocks = [PreActBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, drop_rate, next(rates),
                              shortcut_after_act=i == 0) for j in range(n)]
        stages.append(blocks)
        cin = w
    # Pre-activation leaves the last block's sum un-normalized; the final BN + activation belongs
    # to the last stage, so its features (and forward_features) are what the head pools.
    stages[-1] += [_bn(widths[-1]), _act()]
    return Classifier(
        make_stem(stem, 16, norm_act=False, bias=True), [nn.Sequential(*s) for s in stages], widths, num_classes,
        # The official WRN-28-8 AutoMix places the Mix Block on stage 2 (mask_layer=1, 256 channels).
        mix_head=mix_head, mix_stage=2, default_img_size=DEFAULT_IMG_SIZE[stem],
        stem_type=STEM_NAMES[stem], zero_init_residual=zero_init_residual,
    )


@register_model
def wrn28_8(num_classes, *, mix_head=False, zero_init_residual=False, drop_rate=0.0, drop_path_rate=0.0):
    return wide_resnet(28, 8, num_classes, stem=IMAGENET, mix_head=mix_head,
                       zero_init_residual=zero_init_residual, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


@register_model
def wrn28_8_cifar(num_classes, *, mix_head=False, zero_init_residual=False, drop_rate=0.0, drop_path_rate=0.0):
    return wide_resnet(28, 8, num_classes, stem=CIFAR, mix_head=mix_head,
                       zero_init_residual=zero_init_residual, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
