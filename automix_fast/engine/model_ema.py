"""Exponential moving averages of a model's weights: timm's `--model-ema` and AutoMix's momentum encoder.

`ModelEma` has timm's ModelEmaV3 shape: `module` is the average (a frozen copy of the model,
registered by its owner as a submodule so it is saved in and resumed from its checkpoints),
`update(model, step)` moves it toward the model after an optimizer step, `set(model)` copies
the model into it. Two modes: the default averages every floating-point parameter and buffer
(BN running statistics included) and copies integer buffers (BN's batch counter); with
`exclude_buffers` only the parameters are averaged and the buffers stay the average's own
(the momentum encoder keeps its own BN statistics). Each update is
ema = decay * ema + (1 - decay) * model in one foreach call on the device (no host sync).

The decay of an update is timm's ModelEmaV3.get_decay as timm's train.py calls it (`ema_decay`,
step = optimizer steps done, this one included): 0 at the first update (the copy takes the
model's weights), then the decay, or with warm-up (--model-ema-warmup) min(decay,
1 - t^(-2/3)), so early weights, far from the final ones, are forgotten fast. A decay given to
`update` (a schedule the caller evaluates, such as the momentum encoder's) replaces it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` that starts equal to it."""
    return copy.deepcopy(model).requires_grad_(False)


WARMUP_POWER = 2.0 / 3.0  # timm's ModelEmaV3 warmup_power (warmup_gamma 1)


def ema_decay(decay: float, updates: int, warmup: bool = False) -> float:
    """The decay of the `updates`-th update (1-based: optimizer steps done, this one included)."""
    t = updates - 1
    if t <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + t) ** -WARMUP_POWER) if warmup else decay


def _lerp_(averages: list, targets: list, weight) -> None:
    """averages <- lerp(averages, targets, weight) in one foreach call; `weight` a float or a 0-d
    float32 device tensor (the same numbers for the same float32 value)."""
    if isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(averages, targets, [weight] * len(averages))
    else:
        torch._foreach_lerp_(averages, targets, weight)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float | None = None, *, weight=None) -> None:
    """ema <- decay * ema + (1 - decay) * model for float tensors; other buffers are copied.
    `weight` = 1 - decay (a float, or a 0-d float32 device tensor) replaces `decay` when given."""
    ema_state, model_state = ema.state_dict(), model.state_dict()
    floats = [(ema_state[k], v) for k, v in model_state.items() if v.is_floating_point()]
    if floats:
        _lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - decay if weight is None else weight)
    for k, v in model_state.items():
        if not v.is_floating_point():
            ema_state[k].copy_(v)


class ModelEma:
    """An exponential moving average `module` of a model's weights (see the module doc).

    model: the model averaged (copied into a new frozen `module` unless `module` is given);
    decay: the decay of every update after the first (capped by the warm-up when `warmup`);
    exclude_buffers: average the parameters only, leaving the buffers the average's own.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False, exclude_buffers: bool = False,
                 module: nn.Module | None = None):
        self.module = ema_copy(model) if module is None else module
        self.decay, self.warmup, self.exclude_buffers = float(decay), bool(warmup), bool(exclude_buffers)

    def get_decay(self, step: int | None = None) -> float:
        """The decay of the update after `step` optimizer steps (this one included); None: `decay`."""
        return self.decay if step is None else ema_decay(self.decay, step, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None, decay: float | None = None,
               weight: torch.Tensor | None = None) -> None:
        """Move `module` toward `model` by get_decay(step), or by `decay` when it is given, or by
        `weight`, a 0-d device tensor holding 1 - decay (a step that reads no host value)."""
        if weight is None:
            weight = 1.0 - (self.get_decay(step) if decay is None else decay)
        if self.exclude_buffers:
            _lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        else:
            ema_update(self.module, model, weight=weight)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make `module` equal to `model` (parameters and buffers)."""
        self.module.load_state_dict(model.state_dict())
