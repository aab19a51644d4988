"""ResNet-18/34/50/101 and ResNeXt-50 32x4d, layer for layer as torchvision builds them
(so parameter counts and state-dict shapes match), each with an ImageNet and a CIFAR stem.

Bottlenecks put the stride on the 3x3 conv (ResNet v1.5), as torchvision does.
`drop_path_rate` adds timm's stochastic depth to the residual branches (models/drop_path.py);
it adds no parameters, so state dicts are unchanged.
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .drop_path import drop_path_or_identity, drop_path_rates
from .registry import register_model
from .stems import CIFAR, DEFAULT_IMG_SIZE, IMAGENET, STEM_NAMES, make_stem


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN where the shape changes, None (identity) where it does not."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 drop_path: float = 0.0):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1, base_width=64")
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, planes, stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 drop_path: float = 0.0):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups  # ResNeXt widens the 3x3 group conv
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, cout, stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


def make_stages(block, layers, planes, cin: int, *, groups: int = 1, base_width: int = 64, strides=None,
                drop_path_rate: float = 0.0):
    """One nn.Sequential per stage, the stride on its first block; by default the first stage
    keeps resolution and the others halve it. Returns (stages, stage_channels)."""
    strides = strides or (1,) + (2,) * (len(layers) - 1)
    rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
    stages, channels = [], []
    for n, p, s in zip(layers, planes, strides):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, p, s if j == 0 else 1, groups, base_width, next(rates)))
            cin = p * block.expansion
        stages.append(nn.Sequential(*blocks))
        channels.append(cin)
    return stages, channels


def resnet(block, layers, num_classes: int, *, stem: str, mix_head: bool = False,
           zero_init_residual: bool = True, groups: int = 1, base_width: int = 64,
           planes=(64, 128, 256, 512), drop_path_rate: float = 0.0) -> Classifier:
    stages, channels = make_stages(block, layers, planes, planes[0], groups=groups, base_width=base_width,
                                   drop_path_rate=drop_path_rate)
    return Classifier(
        make_stem(stem, planes[0]), stages, channels, num_classes,
        mix_head=mix_head, mix_stage=3, default_img_size=DEFAULT_IMG_SIZE[stem],
        stem_type=STEM_NAMES[stem], zero_init_residual=zero_init_residual,
    )


# name: (block, blocks per stage, options); each is registered twice: with the ImageNet stem under
# its name, and with the CIFAR stem as `<name>_cifar`.
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), {}),
    "resnet34": (BasicBlock, (3, 4, 6, 3), {}),
    "resnet50": (Bottleneck, (3, 4, 6, 3), {}),
    "resnet101": (Bottleneck, (3, 4, 23, 3), {}),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), {"groups": 32, "base_width": 4}),
}


def _builder(block, layers, stem: str, options: dict):
    def build(num_classes, *, mix_head=False, zero_init_residual=True, drop_path_rate=0.0):
        return resnet(block, layers, num_classes, stem=stem, mix_head=mix_head,
                      zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate, **options)

    return build


for _name, (_block, _layers, _options) in RESNETS.items():
    register_model(_builder(_block, _layers, IMAGENET, _options), name=_name)
    register_model(_builder(_block, _layers, CIFAR, _options), name=_name + "_cifar")
