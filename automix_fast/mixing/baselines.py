"""Baselines on the same engine: vanilla, mixup, cutmix (one head, mixed labels)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Mixer, mix_cross_entropy


class Vanilla(Mixer):
    name = "vanilla"

    def loss(self, x, y, step, total_steps):
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}


class Mixup(Mixer):
    """x = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha)."""

    name = "mixup"

    def __init__(self, model, *, alpha: float = 1.0, **kw):
        super().__init__(model, **kw)
        self.alpha = alpha

    def loss(self, x, y, step, total_steps):
        lam, perm = self.random.pair(self.alpha, x.shape[0], step, 0, x.device)
        x_mix = torch.lerp(x[perm], x, lam)
        loss = mix_cross_entropy(self.model(x_mix), y, perm, lam, self.smoothing)
        return loss, {"loss": loss.detach()}


def cutmix_box(lam: float, h: int, w: int, u: "list[float]") -> tuple[int, int, int, int]:
    """A box of area ~(1 - lam) * h * w centred at a uniform point, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(u[0] * h), int(u[1] * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class CutMix(Mixer):
    """Paste one box of x[perm] into every image; lambda is corrected to the clipped box area."""

    name = "cutmix"

    def __init__(self, model, *, alpha: float = 0.2, **kw):
        super().__init__(model, **kw)
        self.alpha = alpha

    def loss(self, x, y, step, total_steps):
        lam, perm = self.random.pair(self.alpha, x.shape[0], step, 0, x.device)
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(lam, h, w, self.random.uniform(step, 0, 2))
        x_mix = x.clone()  # clone keeps x's memory format
        x_mix[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]  # gathers only the box
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the box area after clipping decides the labels
        loss = mix_cross_entropy(self.model(x_mix), y, perm, lam, self.smoothing)
        return loss, {"loss": loss.detach()}
