"""The model zoo: ResNet-18/34/50/101, ResNeXt-50 32x4d and WRN-28-8, each with an ImageNet
stem (`resnet50`) and a CIFAR stem (`resnet50_cifar`); He et al.'s three-stage CIFAR ResNets
(`resnet20_cifar`, `resnet56_cifar`); plus `tinynet` for tests.

    create_model(name, num_classes, *, mix_head=False, **options) -> Classifier
    list_models() -> list[str]
    model_summary(name) -> str

Importing this package only defines and registers builder functions; nothing is built
until `create_model`. See docs/INTERNALS.md ("models") for the Classifier contract.
"""
from __future__ import annotations

from .classifier import HEADS, Classifier
from .registry import builder_options, create_model, list_models, model_summary, register_model

# Imported for their @register_model side effect.
from . import cifar_resnet, resnet, tiny, wrn  # noqa: E402,F401  isort: skip

__all__ = ["Classifier", "HEADS", "builder_options", "create_model", "list_models", "model_summary", "register_model"]
