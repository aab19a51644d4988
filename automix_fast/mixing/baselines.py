"""Baselines on the same engine: vanilla, and mixup/cutmix as timm's `Mixup` mixes a batch.

`MixupCutmix` follows timm.data.Mixup in its default 'batch' mode: per batch, mix at all with
probability `prob`; when both alphas are positive, cutmix with probability `switch_prob`,
else mixup; lambda ~ Beta(alpha, alpha) of the chosen one; cutmix's lambda is corrected to
the clipped box area. Differences from timm: partners are a random permutation (timm flips
the batch), and the labels are mixed in the loss (mixCE) rather than as soft targets, the
same thing for cross-entropy. Every draw is a host-side function of (seed, step): nothing
waits on the device to decide, and a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Mixer, mix_cross_entropy

DECISION_STREAM = 3  # StepRandom stream of the per-batch (mix at all?, cutmix?) draws


class Vanilla(Mixer):
    name = "vanilla"

    def loss(self, x, y, step, total_steps):
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}


def cutmix_box(lam: float, h: int, w: int, u: "list[float]") -> tuple[int, int, int, int]:
    """A box of area ~(1 - lam) * h * w centred at a uniform point, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(u[0] * h), int(u[1] * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class MixupCutmix(Mixer):
    """mixup: x = lam x + (1 - lam) x[perm]; cutmix: one box of x[perm] pasted into every image."""

    name = "mixup_cutmix"

    def __init__(self, model, *, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, **kw):
        super().__init__(model, **kw)
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    @property
    def label(self) -> str:
        parts = [f"{k} {a:g}" for k, a in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)) if a > 0]
        text = " / ".join(parts) + (f" (cutmix share {self.switch_prob:g})" if len(parts) == 2 else "")
        if self.prob < 1:
            text += f" on {self.prob:.0%} of batches"
        return text + (f" + model EMA {self.model_ema_decay:g}" if self.model_ema is not None else "")

    def choose(self, step: int) -> str | None:
        """'mixup', 'cutmix' or None (this batch is not mixed), as timm's _params_per_batch."""
        u_mix, u_switch = self.random.uniform(step, DECISION_STREAM, 2)
        if u_mix >= self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if u_switch < self.switch_prob else "mixup"
        return "mixup" if self.mixup_alpha > 0 else "cutmix"

    def loss(self, x, y, step, total_steps):
        kind = self.choose(step)
        if kind is None:
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
            return loss, {"loss": loss.detach()}
        alpha = self.mixup_alpha if kind == "mixup" else self.cutmix_alpha
        lam, perm = self.random.pair(alpha, x.shape[0], step, 0, x.device)
        if kind == "mixup":
            x_mix = torch.lerp(x[perm], x, lam)
        else:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(lam, h, w, self.random.uniform(step, 0, 2))
            x_mix = x.clone()  # clone keeps x's memory format
            x_mix[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]  # gathers only the box
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the box area after clipping decides the labels
        loss = mix_cross_entropy(self.model(x_mix), y, perm, lam, self.smoothing)
        return loss, {"loss": loss.detach()}


def baseline_alphas(mix: str, mix_alpha: float | None, mixup: float | None, cutmix: float | None) -> tuple[float, float]:
    """(mixup alpha, cutmix alpha) of `--mix mixup|cutmix`: from timm's --mixup/--cutmix when
    given (see config.resolve_mixup_cutmix), else --mix-alpha for the named one (default
    1.0 mixup, 0.2 cutmix) and 0 for the other."""
    if mixup is not None or cutmix is not None:
        return mixup or 0.0, cutmix or 0.0
    if mix == "mixup":
        return (1.0 if mix_alpha is None else mix_alpha), 0.0
    return 0.0, (0.2 if mix_alpha is None else mix_alpha)
