"""Baselines on the same engine: vanilla, and mixup/cutmix as timm's `Mixup` mixes a batch.

`MixupCutmix` follows timm.data.Mixup. In its default 'batch' mode, per batch: mix at all with
probability `prob`; when both alphas are positive, cutmix with probability `switch_prob`, else
mixup; lambda ~ Beta(alpha, alpha) of the chosen one; cutmix's lambda is corrected to the
clipped box area. In 'elem' mode each sample makes those draws for itself (its own lambda,
kind and box); 'pair' makes them per pair of partners, and both members of a pair take each
other's pixels with the same lambda (and box). `cutmix_minmax` (timm's --cutmix-minmax) draws
the box's height and width uniformly between those fractions of the image instead of from
lambda, which is then the box's area. Differences from timm: partners are a random
permutation (a random pairing in 'pair' mode; timm flips the batch), and the labels are mixed
in the loss (mixCE) rather than as soft targets, the same thing for cross-entropy. Every draw
is a host-side function of (seed, step): nothing waits on the device to decide, and a resumed
run draws what an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from automix_fast.config.sections import MIXUP_MODES

from .base import DeviceLambda, DeviceScalars, Mixer, blend, copy_from_host, mix_cross_entropy, to_device

DECISION_STREAM = 3  # StepRandom stream of the per-batch (mix at all?, cutmix?) draws
ELEM_STREAM = 4  # ... and of the per-sample draws of the elem and pair modes
MODES = MIXUP_MODES


class Vanilla(Mixer):
    name = "vanilla"

    def loss(self, x, y, step, total_steps):
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}

    static_step = True

    def static_forward_backward(self, x, y, buffers, kind, autocast, backward):
        return self.forward_backward(x, y, 0, 0, autocast, backward)  # no per-step value but the EMA's


def cutmix_boxes(lam: np.ndarray, h: int, w: int, u: np.ndarray) -> np.ndarray:
    """Boxes of area ~(1 - lam) * h * w centred at uniform points (u: (n, 2) in [0, 1)),
    clipped to the image: (n, 4) rows y0, y1, x0, x1."""
    cut = np.sqrt(1.0 - np.asarray(lam, dtype=np.float64))
    ch, cw = (h * cut).astype(np.int64), (w * cut).astype(np.int64)
    cy, cx = (u[:, 0] * h).astype(np.int64), (u[:, 1] * w).astype(np.int64)
    return np.stack([np.maximum(cy - ch // 2, 0), np.minimum(cy + ch // 2, h),
                     np.maximum(cx - cw // 2, 0), np.minimum(cx + cw // 2, w)], axis=1)


def cutmix_box(lam: float, h: int, w: int, u: "list[float]") -> tuple[int, int, int, int]:
    """One cutmix_boxes box: (y0, y1, x0, x1)."""
    return tuple(int(v) for v in cutmix_boxes(np.array([lam]), h, w, np.asarray(u, dtype=np.float64)[None])[0])


def minmax_boxes(minmax: "tuple[float, float]", h: int, w: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """timm's rand_bbox_minmax: height and width uniform integers in [min, max) of the image's,
    placed uniformly inside it; (n, 4) rows y0, y1, x0, x1."""
    lo, hi = minmax
    ch = rng.integers(int(h * lo), max(int(h * hi), int(h * lo) + 1), size=n)
    cw = rng.integers(int(w * lo), max(int(w * hi), int(w * lo) + 1), size=n)
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return np.stack([y0, y0 + ch, x0, x0 + cw], axis=1)


def box_area_lam(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """The lambda a box leaves: the share of the image that stays the sample's own."""
    return 1.0 - (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / float(h * w)


def random_pairing(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a random `order` taken two by two as partners: (partner, pair), where
    partner[partner[i]] == i and pair[i] numbers i's pair. An odd image out is its own partner."""
    n = order.numel()
    partner, m = torch.arange(n), n - n % 2  # everyone its own partner until paired: the odd one out stays so
    partner[order[0:m:2]], partner[order[1:m:2]] = order[1:m:2], order[0:m:2]
    pair = torch.empty_like(order)
    pair[order] = torch.arange(n) // 2
    return partner, pair


class MixupCutmix(Mixer):
    """mixup: x = lam x + (1 - lam) x[perm]; cutmix: one box of x[perm] pasted into every image."""

    name = "mixup_cutmix"

    def __init__(self, model, *, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", cutmix_minmax: "tuple[float, float] | None" = None,
                 **kw):
        super().__init__(model, **kw)
        if cutmix_minmax is not None:
            lo, hi = (float(v) for v in cutmix_minmax)
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"cutmix_minmax must be two fractions 0 <= min < max <= 1, got {cutmix_minmax!r}")
            cutmix_alpha = cutmix_alpha if cutmix_alpha > 0 else 1.0  # as timm: the box range turns cutmix on
            cutmix_minmax = (lo, hi)
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        if mode not in MODES:
            raise ValueError(f"mixup mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.mode, self.cutmix_minmax = mode, cutmix_minmax

    def mix_alpha(self, kind: str) -> float | None:
        return {"mixup": self.mixup_alpha, "cutmix": self.cutmix_alpha}.get(kind)

    @property
    def label(self) -> str:
        cut = (f"cutmix boxes {self.cutmix_minmax[0]:g}-{self.cutmix_minmax[1]:g} of the side"
               if self.cutmix_minmax is not None else f"cutmix {self.cutmix_alpha:g}")
        parts = [f"mixup {self.mixup_alpha:g}"] * (self.mixup_alpha > 0) + [cut] * (self.cutmix_alpha > 0)
        text = " / ".join(parts) + (f" (cutmix share {self.switch_prob:g})" if len(parts) == 2 else "")
        per = {"pair": "pair", "elem": "image"}.get(self.mode)
        if per:
            text += f", drawn per {per}"
        if self.prob < 1:
            text += f" on {self.prob:.0%} of {per + 's' if per else 'batches'}"
        return text + self.ema_label

    def choose(self, step: int) -> str | None:
        """'mixup', 'cutmix' or None (this batch is not mixed), as timm's _params_per_batch."""
        u_mix, u_switch = self.random.uniform(step, DECISION_STREAM, 2)
        if u_mix >= self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if u_switch < self.switch_prob else "mixup"
        return "mixup" if self.mixup_alpha > 0 else "cutmix"

    def batch_draws(self, n: int, h: int, w: int, step: int) -> dict | None:
        """The batch mode's host draws of step `step` for n images of h x w: None (the batch is
        not mixed), or {"kind": "mixup" | "cutmix", "lam": the labels' lambda, "perm": the
        partners (a CPU tensor), "box": cutmix's (y0, y1, x0, x1) of the partner pasted, or None}."""
        kind = self.choose(step)
        if kind is None:
            return None
        lam = self.random.beta(self.mix_alpha(kind), step, 0)
        perm = self.random.perm(n, step, 0, "cpu")
        box = None
        if kind == "cutmix":
            if self.cutmix_minmax is not None:
                box = minmax_boxes(self.cutmix_minmax, h, w, self.random.per_sample(step, 0, per_rank=False), 1)[0]
            else:
                box = cutmix_box(lam, h, w, self.random.uniform(step, 0, 2))
            box = tuple(int(v) for v in box)
            lam = float(box_area_lam(np.array([box]), h, w)[0])  # the box after clipping decides the labels
        return {"kind": kind, "lam": lam, "perm": perm, "box": box}

    def loss(self, x, y, step, total_steps):
        if self.mode != "batch":
            n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
            draws, partner = self.draws_tensor(n, h, w, step, x.dtype)
            return self.per_sample_loss(x, y, to_device(draws, x.device), to_device(partner, x.device))
        draws = self.batch_draws(x.shape[0], x.shape[-2], x.shape[-1], step)
        if draws is None:
            return self.batch_loss(x, y, None, None, None, None)
        return self.batch_loss(x, y, draws["kind"], draws["lam"], to_device(draws["perm"], x.device), draws["box"])

    def batch_loss(self, x, y, kind, lam, perm, box):
        """The batch mode's loss of a step of `kind` (None: not mixed) from its draws: `lam` a float
        and `box` ints (the eager step), or a DeviceLambda and 0-d tensors (the static step: the
        same numbers, and the same operations wherever the box lies)."""
        if kind is None:
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
            return loss, {"loss": loss.detach()}
        x_mix = blend(x[perm], x, lam) if kind == "mixup" else paste_box(x, perm, box)
        loss = mix_cross_entropy(self.model(x_mix), y, perm, lam, self.smoothing)
        return loss, {"loss": loss.detach()}

    def draws_per_sample(self, n: int, h: int, w: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The elem/pair modes' host draws for a batch of n: (lam_mixup, boxes, lam), one row per
        sample. lam_mixup is the blend weight of the sample's own pixels outside its box (1 where
        it is cut-mixed or not mixed), boxes (n, 4) its partner's box (empty unless cut-mixed),
        lam the share of the sample that stays its own, which weighs its labels. 'pair' draws
        for n // 2 pairs; the caller gives both members of a pair the pair's row."""
        rng = self.random.per_sample(step, ELEM_STREAM)
        mixed = rng.random(n) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = rng.random(n) < self.switch_prob
        else:
            cut = np.full(n, self.cutmix_alpha > 0)
        lam_mixup = rng.beta(self.mixup_alpha, self.mixup_alpha, n) if self.mixup_alpha > 0 else np.ones(n)
        if self.cutmix_minmax is not None:
            boxes = minmax_boxes(self.cutmix_minmax, h, w, rng, n)
        else:
            lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n) if self.cutmix_alpha > 0 else np.ones(n)
            boxes = cutmix_boxes(lam_cut, h, w, rng.random((n, 2)))
        boxes[~(mixed & cut)] = 0  # an empty box: nothing pasted
        lam_mixup = np.where(mixed & ~cut, lam_mixup, 1.0)
        lam = np.where(mixed & cut, box_area_lam(boxes, h, w), lam_mixup)
        return lam_mixup, boxes, lam

    def partners(self, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The elem/pair modes' (partner, draw row) of each image, on the host: elem, a random
        permutation and a row each; pair, a random pairing and a row per pair."""
        order = self.random.perm(n, step, ELEM_STREAM, "cpu")
        return random_pairing(order) if self.mode == "pair" else (order, torch.arange(n))

    def draws_tensor(self, n: int, h: int, w: int, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The elem/pair modes' draws of step `step` as CPU tensors: ((n, 6) float32 rows of the
        partner's box y0, y1, x0, x1, the blend weight of the sample's own pixels and the labels'
        lambda; the partner of each image). Images of dtype `dtype` blend in it, so the labels
        take the same rounded lambda."""
        partner, row = self.partners(n, step)
        row = row.numpy()
        lam_mixup, boxes, lam = (a[row] for a in self.draws_per_sample(int(row.max()) + 1, h, w, step))
        if dtype != torch.float32:
            rounded = torch.from_numpy(lam_mixup).to(dtype).double().numpy()
            lam = np.where(lam_mixup < 1.0, rounded, lam)
            lam_mixup = rounded
        draws = torch.from_numpy(np.concatenate([boxes.astype(np.float32), lam_mixup[:, None].astype(np.float32),
                                                 lam[:, None].astype(np.float32)], axis=1))
        return draws, partner

    def per_sample_loss(self, x, y, draws, partner):
        """The elem/pair modes' loss from their draws on x's device (`draws_tensor`): one lerp,
        weight 0 inside a box (the partner's pixel, exactly), lam_mixup elsewhere (1: the sample's
        own pixel, exactly)."""
        b = draws[:, :4, None, None]
        inside = box_mask(x, (b[:, 0], b[:, 1], b[:, 2], b[:, 3]))  # (n, h, w)
        weight = torch.where(inside, 0.0, draws[:, 4, None, None]).unsqueeze(1).to(x.dtype)
        x_mix = torch.lerp(x[partner], x, weight)
        loss = mix_cross_entropy(self.model(x_mix), y, partner, draws[:, 5], self.smoothing)
        return loss, {"loss": loss.detach()}

    # The static-buffer step (see Mixer.static_step): the batch mode's steps come in three kinds
    # (not mixed, mixup, cutmix: one graph each), the elem/pair modes' in one.
    static_step = True
    BOX_SCALARS = ("box_y0", "box_y1", "box_x0", "box_x1")
    STATIC_SCALARS = ("lam", "partner", *BOX_SCALARS)

    def step_kind(self, step: int):
        return self.choose(step) if self.mode == "batch" else "per_sample"

    def static_buffers(self, x) -> dict:
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        buffers = super().static_buffers(x)  # the model EMA's weight, when there is one
        names = buffers["scalars"].names + (self.STATIC_SCALARS if self.mode == "batch" else ())
        buffers.update(scalars=DeviceScalars(names, x.device), image=(n, h, w, x.dtype),
                       perm=torch.zeros(n, dtype=torch.long, device=x.device))
        if self.mode != "batch":
            buffers["draws"] = torch.zeros(n, 6, dtype=torch.float32, device=x.device)
        return buffers

    def fill_static(self, buffers: dict, step: int, total_steps: int) -> None:
        """Step `step`'s draws into `buffers`: the scalars in one copy, the partners in another
        (the draws of the elem/pair modes in a third); a value the step's kind does not read is 0."""
        n, h, w, dtype = buffers["image"]
        values = self.ema_values(step)
        if self.mode != "batch":
            draws, partner = self.draws_tensor(n, h, w, step, dtype)
            copy_from_host(buffers["draws"], draws)
        else:
            draws = self.batch_draws(n, h, w, step) or {"lam": 0.0, "perm": None, "box": None}
            box, lam = draws["box"] or (0, 0, 0, 0), draws["lam"]
            values.update(lam=lam, partner=1.0 - lam, **dict(zip(self.BOX_SCALARS, box)))
            partner = draws["perm"]
        buffers["scalars"].fill(values)
        if partner is not None:
            copy_from_host(buffers["perm"], partner)

    def static_forward_backward(self, x, y, buffers, kind, autocast, backward):
        with autocast():
            if kind == "per_sample":
                loss, logs = self.per_sample_loss(x, y, buffers["draws"], buffers["perm"])
            else:
                sc = buffers["scalars"]
                box = tuple(sc[k] for k in self.BOX_SCALARS)
                loss, logs = self.batch_loss(x, y, kind, DeviceLambda(sc["lam"], sc["partner"]), buffers["perm"], box)
        backward(loss)
        return loss.detach(), logs


def box_mask(x: torch.Tensor, box) -> torch.Tensor:
    """The pixels of x's h x w images inside `box` (y0, y1, x0, x1: tensors that broadcast against
    (h, w), as 0-d or (n, 1, 1) ones do), as a bool tensor of the broadcast shape."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=torch.float32).view(h, 1)
    cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, w)
    y0, y1, x0, x1 = box
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def paste_box(x: torch.Tensor, perm: torch.Tensor, box) -> torch.Tensor:
    """x with each image's partner x[perm] pasted inside `box` (y0, y1, x0, x1), in x's memory
    format: ints slice (only the box is gathered); 0-d tensors make a mask (the same operations
    wherever the box lies, and the same values)."""
    y0, y1, x0, x1 = box
    if isinstance(y0, torch.Tensor):
        return torch.where(box_mask(x, box), x[perm], x)
    x_mix = x.clone()  # clone keeps x's memory format
    x_mix[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]  # gathers only the box
    return x_mix


def baseline_alphas(mix: str, mix_alpha: float | None, mixup: float | None, cutmix: float | None) -> tuple[float, float]:
    """(mixup alpha, cutmix alpha) of `--mix mixup|cutmix`: from timm's --mixup/--cutmix when
    given (see config.resolve_mixup_cutmix), else --mix-alpha for the named one (default
    1.0 mixup, 0.2 cutmix) and 0 for the other."""
    if mixup is not None or cutmix is not None:
        return mixup or 0.0, cutmix or 0.0
    if mix == "mixup":
        return (1.0 if mix_alpha is None else mix_alpha), 0.0
    return 0.0, (0.2 if mix_alpha is None else mix_alpha)
