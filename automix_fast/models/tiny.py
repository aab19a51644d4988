"""tinynet: a four-stage ResNet small enough that a whole AutoMix step on CPU takes
milliseconds, for tests, smoke runs and the CI training check. Not for accuracy."""
from __future__ import annotations

from .classifier import Classifier
from .registry import register_model
from .resnet import BasicBlock, make_stages
from .stems import CIFAR, DEFAULT_IMG_SIZE, STEM_NAMES, make_stem

TINY_PLANES = (16, 32, 64, 128)


@register_model
def tinynet(num_classes, *, mix_head=False, zero_init_residual=True):
    # One BasicBlock per stage: the same block types and mix stage (3, 8x8 at 32 px) as
    # resnet18_cifar, so it exercises the same code paths at a fraction of the cost.
    stages, channels = make_stages(BasicBlock, (1, 1, 1, 1), TINY_PLANES, TINY_PLANES[0])
    return Classifier(
        make_stem(CIFAR, TINY_PLANES[0]), stages, channels, num_classes,
        mix_head=mix_head, mix_stage=3, default_img_size=DEFAULT_IMG_SIZE[CIFAR],
        stem_type=STEM_NAMES[CIFAR], zero_init_residual=zero_init_residual,
    )
