"""timm's `--model-ema`: an exponential moving average of the model's weights.

After each optimizer step, every floating-point parameter and buffer (BN running statistics
included) moves toward the model's: ema = decay * ema + (1 - decay) * model, in one foreach
call on the device (no host sync); integer buffers (BN's batch counter) are copied. This is
timm's ModelEmaV3 without warmup. The copy is evaluated as its own head (`ema`) and, being a
submodule of the mixing policy, is saved in and resumed from its checkpoints.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` that starts equal to it."""
    return copy.deepcopy(model).requires_grad_(False)


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
