"""timm's `--model-ema`: an exponential moving average of the model's weights.

After each optimizer step, every floating-point parameter and buffer (BN running statistics
included) moves toward the model's: ema = decay * ema + (1 - decay) * model, in one foreach
call on the device (no host sync); integer buffers (BN's batch counter) are copied. The decay
at the t-th update is timm's ModelEmaV3.get_decay as timm's train.py calls it (`ema_decay`):
0 at the first update (the copy takes the model's weights), then the decay, or with
--model-ema-warmup min(decay, 1 - t^(-2/3)), so early weights, far from the final ones, are
forgotten fast. The copy is evaluated as its own head (`ema`) and, being a
submodule of the mixing policy, is saved in and resumed from its checkpoints.
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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for float tensors; other buffers are copied."""
    ema_state, model_state = ema.state_dict(), model.state_dict()
    floats = [(ema_state[k], v) for k, v in model_state.items() if v.is_floating_point()]
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - decay)
    for k, v in model_state.items():
        if not v.is_floating_point():
            ema_state[k].copy_(v)
