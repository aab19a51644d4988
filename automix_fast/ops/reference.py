"""The plain-PyTorch reference of the Mix Block's two ops.

This is the one place the math lives in torch: the dispatcher uses it as the fallback
(`backend="torch"`), the tests hold the Triton kernels to it, and the benchmarks time it.
It favours clarity over speed: it materializes the N x L x L attention matrix and the
N x 1 x H x W mask in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from automix_fast.kernels.common import is_channels_last


def mixblock_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """out[n, i] = sum_j softmax_j(q[n, i] . k[n, j] * scale) * v[n, j], in float32.

    q: (N, L, D), k: (N, Lk, D), v: (N, Lk). Returns (N, L) float32.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):  # float32 as promised, also inside autocast
        scores = torch.bmm(q.float(), k.float().transpose(1, 2)) * scale
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v.float().unsqueeze(-1)).squeeze(-1)


def upsample_mask(logits: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """s = sigmoid(interpolate(logits, size, mode)) in float32: the partner weight per pixel."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    with torch.autocast(logits.device.type, enabled=False):
        return torch.sigmoid(F.interpolate(logits.float(), size=size, mode=mode, **kwargs))


def mask_mix(logits: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """x_mix = (1 - s) * x + s * x[perm] with s the upsampled sigmoid mask.

    Returns x_mix in x's dtype and memory format, and s_mean (N,) float32. Only `logits`
    gets a gradient: x is data.
    """
    x = x.detach()
    s = upsample_mask(logits, tuple(x.shape[-2:]), mode)
    mixed = torch.lerp(x.float(), x[perm].float(), s)
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    x_mix = mixed.to(dtype=x.dtype).contiguous(memory_format=memory_format)
    return x_mix, s.mean(dim=(1, 2, 3))
