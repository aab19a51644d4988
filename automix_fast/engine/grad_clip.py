"""timm's `--clip-grad` / `--clip-mode`: norm, value, or adaptive (AGC) gradient clipping.

Called between backward (after GradScaler's unscale under fp16) and the optimizer step.
None of the modes reads a device value on the host: the clip coefficient stays a device
tensor, so clipping adds no sync to the step. A non-finite gradient stays non-finite and
the step is skipped by the usual check.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch

from automix_fast.config.sections import CLIP_MODES


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    # AGC: one norm per output unit (row of a linear, filter of a conv); whole-tensor for 1-d.
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad(params: list[torch.Tensor], clip_factor: float, eps: float = 1e-3) -> None:
    """Brock et al. 2021 (as timm): scale a unit's gradient to at most clip_factor times its weight norm."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach()
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
        grad_norm = _unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped))


def grad_clipper(value: float | None, mode: str = "norm", heads: Iterable[torch.Tensor] = ()
                 ) -> Callable[[list[torch.Tensor]], None] | None:
    """clip(params) for `--clip-grad value --clip-mode mode`, or None when value is None. `heads`:
    the classifier heads' parameters, which agc leaves out (timm's train.py clips
    `model_parameters(model, exclude_head=True)` in that mode); norm and value clip them too."""
    if value is None:
        return None
    if mode == "norm":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, value)  # error_if_nonfinite off: no sync
    if mode == "value":
        return lambda params: torch.nn.utils.clip_grad_value_(params, value)
    if mode == "agc":
        skip = {id(p) for p in heads}
        return lambda params: adaptive_clip_grad([p for p in params if id(p) not in skip], value)
    raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
