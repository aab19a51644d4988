"""tinynet: a small plain (VGG-style) four-stage net for CPU smoke runs, tests and the default
`automix-fast train` on the embedded dataset. Not for accuracy records.

Layout at 32 px: stem conv 3->16 (32 px); stage 1 max-pool + conv 16->32 (16 px); stage 2
max-pool + conv 32->64 (8 px); stage 3 conv 64->64 (8 px, the mix stage: an 8x8 map for the
Mix Block, as resnet18_cifar gives); stage 4 max-pool + conv 64->128 (4 px). Each conv is
3x3 + BN + ReLU. About 13 MFLOP per 32 px image forward.

Why not a tiny ResNet: measured on the embedded dataset on 2 CPU cores, a one-block-per-stage
ResNet narrow enough to be as fast (8/16/32/64 channels, early strides) stayed near chance for
4 epochs, while this plain net with early max-pooling reached ~40% in the same time.
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .registry import register_model
from .stems import CIFAR, DEFAULT_IMG_SIZE, STEM_NAMES

TINY_STEM = 16
TINY_STAGES = ((32, True), (64, True), (64, False), (128, True))  # (channels, max-pool first)


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register_model
def tinynet(num_classes, *, mix_head=False, zero_init_residual=True):
    stages, c_in = [], TINY_STEM
    for c_out, pool in TINY_STAGES:
        stages.append(nn.Sequential(*([nn.MaxPool2d(2)] if pool else []), *conv_bn_relu(c_in, c_out)))
        c_in = c_out
    return Classifier(
        nn.Sequential(*conv_bn_relu(3, TINY_STEM)), stages, [c for c, _ in TINY_STAGES], num_classes,
        mix_head=mix_head, mix_stage=3, default_img_size=DEFAULT_IMG_SIZE[CIFAR],
        stem_type=STEM_NAMES[CIFAR], zero_init_residual=zero_init_residual,  # no residual blocks: a no-op
    )
