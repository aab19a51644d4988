"""Stochastic depth (`--drop-path`, Huang et al. 2016) with timm's meaning.

In training, each sample's residual branch is zeroed with probability p and scaled by
1 / (1 - p) otherwise; in eval mode the branch passes unchanged. timm's linear rule sets
p for block i of n (counted over all stages) to rate * i / (n - 1): 0 for the first block,
`rate` for the last. The mask is drawn on the device: no host sync.
"""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """timm's linear rule: block i of num_blocks gets rate * i / (num_blocks - 1)."""
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def drop_path_or_identity(p: float) -> nn.Module:
    # Identity where p is 0 keeps the module tree (and printouts) as they were without the flag.
    return DropPath(p) if p > 0 else nn.Identity()
