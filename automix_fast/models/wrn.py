"""WRN-28-8: the pre-activation wide ResNet of Zagoruyko & Komodakis (2016), in the layout
of their reference code: 3 stages of 4 blocks, widths 16k/32k/64k with k = 8, a final
BN + ReLU before pooling, no conv biases, no dropout by default. The Mix Block reads stage 2
(256 channels, 16x16 at 32 px), as in the official AutoMix WRN-28-8 recipe.
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .drop_path import drop_path_or_identity, drop_path_rates
from .registry import register_model
from .stems import CIFAR, DEFAULT_IMG_SIZE, IMAGENET, STEM_NAMES, make_stem


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the input. Where the shape changes the
    shortcut is a 1x1 conv on the pre-activated input, as in the reference WRN code."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)  # the block input is reused by the shortcut
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.drop_path = drop_path_or_identity(drop_path)  # stochastic depth on the residual branch

    def zero_init_last(self) -> None:
        # Zero the last conv, not bn2: a zero bn2 gamma feeds ReLU(0) whose gradient is 0,
        # so gamma and beta would never move and the block would stay dead. A zero conv2
        # still gets a gradient (its input is non-zero) and starts the block as identity.
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x):
        act = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.drop(self.relu(self.bn2(out))))
        return self.drop_path(out) + identity


def wide_resnet(depth: int, widen: int, num_classes: int, *, stem: str, mix_head: bool = False,
                zero_init_residual: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> Classifier:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    cin, stages = 16, []
    rates = iter(drop_path_rates(drop_path_rate, 3 * n))  # timm's linear rule over all blocks
    for i, w in enumerate(widths):
        blocks = [PreActBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, drop_rate, next(rates))
                  for j in range(n)]
        stages.append(blocks)
        cin = w
    # Pre-activation leaves the last block's sum un-normalized; the final BN + ReLU belongs to
    # the last stage, so its features (and forward_features) are what the head pools.
    stages[-1] += [nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True)]
    return Classifier(
        make_stem(stem, 16, norm_act=False), [nn.Sequential(*s) for s in stages], widths, num_classes,
        # The official WRN-28-8 AutoMix places the Mix Block on stage 2 (mask_layer=1, 256 channels).
        mix_head=mix_head, mix_stage=2, default_img_size=DEFAULT_IMG_SIZE[stem],
        stem_type=STEM_NAMES[stem], zero_init_residual=zero_init_residual,
    )


@register_model
def wrn28_8(num_classes, *, mix_head=False, zero_init_residual=True, drop_rate=0.0, drop_path_rate=0.0):
    return wide_resnet(28, 8, num_classes, stem=IMAGENET, mix_head=mix_head,
                       zero_init_residual=zero_init_residual, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


@register_model
def wrn28_8_cifar(num_classes, *, mix_head=False, zero_init_residual=True, drop_rate=0.0, drop_path_rate=0.0):
    return wide_resnet(28, 8, num_classes, stem=CIFAR, mix_head=mix_head,
                       zero_init_residual=zero_init_residual, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
