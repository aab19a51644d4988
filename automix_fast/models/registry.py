"""The model registry: names -> builder functions, and the checks on what users ask for.

Builders are registered when their module is imported (which only defines functions); a
network is built only by `create_model`. `model_summary` builds on the meta device, so
listing the zoo allocates and initializes nothing.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import ConfigError
from .classifier import Classifier

Builder = Callable[..., Classifier]

_REGISTRY: dict[str, Builder] = {}


def register_model(fn: Builder | None = None, *, name: str | None = None):
    """Register `fn(num_classes, *, mix_head=False, **options) -> Classifier` under `name`
    (default: the function's name). Usable as `@register_model` or `@register_model(name=...)`."""

    def add(f: Builder) -> Builder:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose from: {', '.join(list_models())}")
    return _REGISTRY[name]


def builder_options(name: str) -> list[str]:
    """The options model `name`'s builder takes besides num_classes and mix_head (ConfigError for
    an unknown name)."""
    return [p for p in inspect.signature(_builder(name)).parameters if p not in ("num_classes", "mix_head")]


def create_model(name: str, num_classes: int, *, mix_head: bool = False, **kwargs) -> Classifier:
    """Build model `name` with a `num_classes`-way head `head_one` (and `head_mix` when
    `mix_head`). Extra options (e.g. zero_init_residual) go to the builder."""
    builder = _builder(name)
    # bool is an int subclass; a True here is a config mistake, not one class.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    options = builder_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(options) or 'none'}"
        )
    model = builder(num_classes, mix_head=bool(mix_head), **kwargs)
    model.arch = name
    return model


def model_summary(name: str) -> str:
    """One line for `automix-fast models`: stem, stage channels, parameters, default image size."""
    builder = _builder(name)
    # The class count the model is usually trained with, so the parameter count is the known one.
    with torch.device("meta"):
        probe = builder(1000)
        classes = 1000 if probe.default_img_size >= 224 else 10
        model = probe if classes == 1000 else builder(classes)
    params = sum(p.numel() for p in model.parameters())
    channels = "-".join(str(c) for c in model.stage_channels)
    return (
        f"{name}: {model.stem_type} stem, stages {channels}, mix stage {model.mix_stage}, "
        f"{params / 1e6:.2f}M params @ {classes} classes, img {model.default_img_size}"
    )
