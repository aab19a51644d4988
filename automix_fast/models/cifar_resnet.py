"""He et al.'s CIFAR ResNets (arXiv 1512.03385, section 4.2): `resnet20_cifar`, `resnet56_cifar`.

Layout: 3x3 conv 3->16 + BN + ReLU at 32 px, then three stages of n basic blocks with 16, 32
and 64 channels at 32, 16 and 8 px (depth 6n + 2: n = 3 for ResNet-20, 9 for ResNet-56),
global average pooling and the linear heads. About 41 and 125 MFLOPs (multiply-adds) per
32 px image forward; 0.27M and 0.85M parameters with a 10-way head, as Table 6 of the paper.

Shortcuts: option A, as the paper uses for CIFAR ("all shortcuts are identity" with
zero-padded channels where the width doubles): it adds no parameters, so the counts are the
paper's (option B's 1x1 projections would add ~2.7k parameters and are not what the CIFAR
numbers were measured with). The downsampling shortcut takes every other pixel and pads the
new channels with zeros.

Mix stage: stage 2 (32 channels, a 16x16 map at 32 px). The official code puts the Mix Block
on the second-to-last stage of every CIFAR backbone: stage 3 of 4 for ResNet-18 (out_indices
(2, 3)) and, for the one three-stage CIFAR net it ships, WRN-28-8, stage 2 of 3 (mask_layer=1,
256 channels, 16x16). These ResNets have WRN's three-stage layout, so they follow WRN.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .classifier import Classifier
from .drop_path import drop_path_rates
from .registry import register_model
from .resnet import BasicBlock
from .stems import CIFAR, DEFAULT_IMG_SIZE, STEM_NAMES, make_stem

CIFAR_RESNET_CHANNELS = (16, 32, 64)
CIFAR_RESNET_MIX_STAGE = 2


class PadShortcut(nn.Module):
    """Option A: x[:, :, ::stride, ::stride] with the extra channels zero (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class CifarBasicBlock(BasicBlock):
    """The paper's two-layer block (torchvision's BasicBlock) with an option-A shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__(cin, cout, stride, drop_path=drop_path)
        self.downsample = PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else None


def cifar_resnet(depth: int, num_classes: int, *, mix_head: bool, zero_init_residual: bool,
                 drop_path_rate: float) -> Classifier:
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
    n = (depth - 2) // 6
    rates = iter(drop_path_rates(drop_path_rate, 3 * n))
    stages, cin = [], CIFAR_RESNET_CHANNELS[0]
    for i, cout in enumerate(CIFAR_RESNET_CHANNELS):
        blocks = []
        for b in range(n):
            blocks.append(CifarBasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1, next(rates)))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return Classifier(
        make_stem(CIFAR, CIFAR_RESNET_CHANNELS[0]), stages, CIFAR_RESNET_CHANNELS, num_classes,
        mix_head=mix_head, mix_stage=CIFAR_RESNET_MIX_STAGE, default_img_size=DEFAULT_IMG_SIZE[CIFAR],
        stem_type=STEM_NAMES[CIFAR], zero_init_residual=zero_init_residual,
    )


@register_model
def resnet20_cifar(num_classes, *, mix_head=False, zero_init_residual=True, drop_path_rate=0.0):
    return cifar_resnet(20, num_classes, mix_head=mix_head, zero_init_residual=zero_init_residual,
                        drop_path_rate=drop_path_rate)


@register_model
def resnet56_cifar(num_classes, *, mix_head=False, zero_init_residual=True, drop_path_rate=0.0):
    return cifar_resnet(56, num_classes, mix_head=mix_head, zero_init_residual=zero_init_residual,
                        drop_path_rate=drop_path_rate)
