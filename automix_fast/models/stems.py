"""The two stems every model comes in: ImageNet (downsample 4x early) and CIFAR (keep 32 px)."""
from __future__ import annotations

from torch import nn

IMAGENET = "imagenet"
CIFAR = "cifar"
STEM_TYPES = (IMAGENET, CIFAR)

# One-line descriptions for model_summary.
STEM_NAMES = {IMAGENET: "imagenet (7x7/2 conv + 3x3/2 max-pool)", CIFAR: "cifar (3x3/1 conv)"}

DEFAULT_IMG_SIZE = {IMAGENET: 224, CIFAR: 32}


def make_stem(kind: str, out_channels: int, *, norm_act: bool = True, bias: bool = False) -> nn.Sequential:
    """ImageNet: 7x7 stride-2 conv (+ BN + ReLU when `norm_act`) + 3x3 stride-2 max-pool
    (stride 4 in all). CIFAR: 3x3 stride-1 conv (+ BN + ReLU when `norm_act`), no pooling: 32 px
    images are already small. Pre-activation nets pass norm_act=False, since their first block
    normalizes its input itself (timm's ResNetV2 pre-activation stem is conv + pool alike).
    `bias`: the conv has a bias (OpenMixup's WRN)."""
    if kind == IMAGENET:
        conv = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=bias)
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        if not norm_act:
            return nn.Sequential(conv, pool)
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), pool)
    if kind == CIFAR:
        conv = nn.Conv2d(3, out_channels, 3, stride=1, padding=1, bias=bias)
        if not norm_act:
            return nn.Sequential(conv)
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
    raise ValueError(f"stem must be one of {STEM_TYPES}, got {kind!r}")
