"""AutoMix: a learned Mix Block trained through a momentum encoder.

One step:
  1. lam_mb, lam_bb ~ Beta(alpha, alpha); independent permutations perm_mb, perm_bb.
  2. f = k.stage3(x) without gradients (k in train mode: batch statistics, its own BN stats);
     by default k then runs its remaining stages on f too, as the official code does, so the BN
     statistics after the mix stage also see the clean batch (`k_full_forward`).
  3. m_mb = MB(f, lam_mb, perm_mb) keeps its gradient; m_bb = MB(f, lam_bb, perm_bb) detached.
  4. x_bb: plain mixup when min(lam_bb, 1 - lam_bb) <= 0.08, else the MB mix with m_bb;
     x_mb: the MB mix with m_mb (differentiable w.r.t. m_mb).
  5. L_mix_k = mixCE(k.head_mix(k(x_mb)), y, perm_mb, lam_mb)  -> gradient reaches the MB only
     L_one_q = CE(q.head_one(q(x)), y);  L_mix_q = mixCE(q.head_mix(q(x_bb)), y, perm_bb, lam_bb)
     L_mask  = w_mask(t) * max(|1 - mean(s_mb) - lam_mb| - margin, 0)
  6. loss = L_mix_q + L_one_q + L_mix_k + L_mask; after the optimizer step, the EMA update
     theta_k = m theta_k + (1 - m) theta_q over parameters (not buffers).

With `mix_block_every` N > 1 only steps 0, N, 2N, ... are as above; on the others
the Mix Block gets no gradient: its backbone mask m_bb is computed under no_grad, x_mb is not
built, k does not run on it, and L_mix_k = L_mask = 0 (they log as 0 on those steps; the mask
statistics of those steps describe m_bb at lam_bb instead of m_mb at lam_mb). That saves k's
forward and input-backward on x_mb, about 2 of the ~8.8 backbone units of a full step.

With `q_batched`, q's two passes of step 5 are one: q runs on x and x_bb stacked, head_one on
the first half and head_mix on the second, with one backward. The same work in half as many,
twice as large kernels; BatchNorm's batch (and running) statistics then span both batches, so
it is not the official step (off in every recipe).

Every step also returns the mask statistics of `mask_statistics` (detached device scalars that
the training loop reads with the losses once per log interval; docs/AUTOMIX.md explains them).
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch
import torch.nn.functional as F

from automix_fast.engine.model_ema import ModelEma
from automix_fast.engine.schedule import MASK_LOSS_ANNEALS, CompoundCosine, cosine_anneal, momentum_cosine_start

from .base import (DeviceLambda, DeviceScalars, Mixer, blend, copy_from_host, lam_own, lam_partner, mix_cross_entropy,
                   to_device)
from .mixblock import MixBlock


def encoder_momentum(step: int, total_steps: int, base: float = 0.999, end: float = 0.99999) -> float:
    """base before step int(0.1 T) (the official hook's integer start), then
    end - (end - base) (cos(pi t / T) + 1) / 2."""
    if total_steps <= 0 or step < momentum_cosine_start(total_steps):
        return base
    return cosine_anneal(base, end, step, total_steps)


def _anneal_name(anneal) -> str:
    """bool from configs written before the three-way choice: true was the plain cosine."""
    if isinstance(anneal, bool):
        return "cosine" if anneal else "none"
    if anneal not in MASK_LOSS_ANNEALS:
        raise ValueError(f"mask_loss_anneal must be one of {MASK_LOSS_ANNEALS}, got {anneal!r}")
    return anneal


def mask_loss_weight(step: int, total_steps: int, weight: float, anneal="none") -> float:
    """w_mask at `step`: constant (`none`), the plain cosine to 0 (`cosine`, our alternative), or
    the official compounding cosine (`compound`, CompoundCosine: ~0 after ~3% of training)."""
    anneal = _anneal_name(anneal)
    if anneal == "none" or total_steps <= 0:
        return weight
    if anneal == "cosine":
        return cosine_anneal(weight, 0.0, step, total_steps)
    return CompoundCosine(weight, total_steps)(step)


def derangement(random, n: int, step: int, stream: int, device, *, fallback: bool) -> torch.Tensor:
    """The official `mix_shuffle_no_repeat` permutation: draw up to 10 permutations, keep the
    first without fixed points (no image mixed with itself). When all 10 have one, the official
    code holds an 11th, unchecked draw; with `fallback` (the Mix Block's permutation) it shifts
    every index by a random 1 <= s <= n - 2 instead, a permutation with no fixed point for sure.
    Every draw is a pure function of (seed, step, stream, attempt) like the plain permutation."""
    idx = torch.arange(n)
    for attempt in range(11):
        perm = random.perm(n, step, stream if attempt == 0 else (stream, attempt), "cpu")
        if attempt < 10 and not bool((perm == idx).any()):
            return to_device(perm, device)
    if fallback and n >= 2:
        shift = int(np.random.default_rng([random.seed, step, stream, 2]).integers(1, max(n - 1, 2)))
        perm = (idx + shift) % n
    return to_device(perm, device)


MIX_BLOCK_STREAM, BACKBONE_STREAM = 0, 1  # StepRandom streams of the two branches' draws
SATURATED = 0.05  # a mask pixel is saturated below this or above 1 - this


@torch.no_grad()
def mask_statistics(logits: torch.Tensor, s_mean: torch.Tensor, lam) -> dict[str, torch.Tensor]:
    """What the masks look like, as device scalars (no host read here).

    mask_partner_mean: mean partner weight s over the batch (the mask loss holds it near
    mask_partner_target = 1 - lam); mask_pixel_std: mean over images of the per-image std of s
    (0 for a mask constant over the image); mask_image_std: std across the batch of the per-image
    means (0 when every image gets the same ratio); mask_saturated: share of pixels with s below
    0.05 or above 0.95. The pixel statistics read s at the Mix Block's resolution: exact for
    nearest upsampling by an integer factor (each pixel repeated equally), close for bilinear.
    """
    s = torch.sigmoid(logits.detach().float()).flatten(1)  # (N, h*w)
    s_mean = s_mean.detach().float()
    partner = s_mean.mean()
    target = lam_partner(lam)  # 1 - lam: a host float, or a 0-d float32 tensor of a DeviceLambda
    return {
        "mask_partner_mean": partner,
        "mask_partner_target": target.clone() if torch.is_tensor(target) else torch.full_like(partner, target),
        "mask_pixel_std": s.std(dim=1, unbiased=False).mean(),
        "mask_image_std": s_mean.std(unbiased=False) if s_mean.numel() > 1 else torch.zeros_like(partner),
        "mask_saturated": ((s < SATURATED) | (s > 1.0 - SATURATED)).float().mean(),
    }


def mask_summary(history: list[dict]) -> dict:
    """{"mask_stats": ...}: the mask statistics and Mix Block norms of the last logged interval,
    for summary.json; empty for policies without a Mix Block."""
    means = history[-1].get("train", {}) if history else {}
    stats = {k: v for k, v in means.items() if k.startswith(("mask_", "mix_block_"))}
    return {"mask_stats": stats} if stats else {}


class AutoMix(Mixer):
    name = "automix"
    summed_terms = ("l_mix_q", "l_one_q", "l_mix_k", "l_mask")  # the logged values `loss` is the sum of

    def __init__(
        self,
        model,
        *,
        alpha: float = 2.0,
        momentum_base: float = 0.999,
        momentum_end: float = 0.99999,
        mask_loss_weight: float = 0.1,
        mask_loss_anneal: str = "none",
        mask_margin: float = 0.1,
        lam_margin: float = 0.08,
        lam_concat: bool = False,
        mask_mode: str = "nearest",
        mix_stage: int | None = None,
        kernel_backend: str = "auto",
        k_full_forward: bool = True,
        mix_shuffle_no_repeat: bool = False,
        mix_block_init: str = "official",
        mix_block_every: int = 1,
        q_batched: bool = False,
        **kw,
    ):
        super().__init__(model, **kw)
        if getattr(model, "head_mix", None) is None:
            raise ValueError("AutoMix needs a model built with mix_head=True")
        self.alpha = alpha
        self.momentum_base, self.momentum_end = momentum_base, momentum_end
        self.mask_weight, self.mask_anneal, self.mask_margin = mask_loss_weight, _anneal_name(mask_loss_anneal), mask_margin
        self._compound = None  # CompoundCosine, built on first use (it needs total_steps)
        self.k_full_forward = k_full_forward
        self.q_batched = bool(q_batched)  # q's two passes as one (see batched_q_terms)
        self.no_repeat = mix_shuffle_no_repeat
        self.lam_margin = lam_margin
        if isinstance(mix_block_every, bool) or not isinstance(mix_block_every, int) or mix_block_every < 1:
            raise ValueError(f"mix_block_every must be an integer >= 1, got {mix_block_every!r}")
        self.mix_block_every = mix_block_every
        self.mix_stage = mix_stage or model.mix_stage
        # k: a copy of q that gets no weight gradients. It is a submodule, so it follows the
        # policy's train()/eval(): train mode (batch statistics, its own BN running stats) while
        # training, eval mode for evaluation. Its EMA averages the parameters only (its BN
        # statistics stay its own), with the momentum of `encoder_momentum` at each step.
        self.compiled_step = None  # set by compile_step
        self.k_ema = ModelEma(model, momentum_base, exclude_buffers=True)
        self.momentum_encoder = self.k_ema.module
        self.mix_block = MixBlock(
            model.stage_channels[self.mix_stage - 1], lam_concat=lam_concat, mode=mask_mode, backend=kernel_backend,
            init=mix_block_init,
        )

    def mix_alpha(self, kind: str) -> float | None:
        return self.alpha if kind == "automix" else None

    def mix_block_features(self, x):
        """k's features at the mix stage (no gradient; k in train mode updates its BN statistics)."""
        with torch.no_grad():
            f = self.momentum_encoder.forward_features(x, stages=self.mix_stage)
            if self.k_full_forward:  # only for k's BN running statistics; the output is unused
                self.momentum_encoder.forward_after(f, self.mix_stage)
        return f

    def trains_mix_block(self, step: int) -> bool:
        """Whether `step` runs the Mix Block branch (every step with mix_block_every = 1)."""
        return step % self.mix_block_every == 0

    def mix_masks(self, x, lam_mb, perm_mb, lam_bb, perm_bb):
        """Mask logits for the MB branch (with gradient) and the backbone branch (detached)."""
        f = self.mix_block_features(x)
        size = tuple(f.shape[-2:])
        projected = self.mix_block.project(f)  # once for both masks
        m_mb = self.mix_block.attend(projected, lam_mb, perm_mb, size)
        with torch.no_grad():
            m_bb = self.mix_block.attend(tuple(t.detach() for t in projected), lam_bb, perm_bb, size)
        return m_mb, m_bb

    def draw(self, x, step: int, stream: int, device=None):
        """(lam, perm) of one branch, perm on `device` (default x's); a pure function of (seed, step, stream)."""
        device = x.device if device is None else device
        if self.no_repeat:  # the official fine-grained recipes: no image mixed with itself
            perm = derangement(self.random, x.shape[0], step, stream, device, fallback=stream == MIX_BLOCK_STREAM)
            return self.random.beta(self.alpha, step, stream), perm
        return self.random.pair(self.alpha, x.shape[0], step, stream, device)

    def plain_mixup(self, lam_bb: float) -> bool:
        """Whether x_bb is plain mixup: lam_bb within lam_margin of 0 or 1 (a host float: no sync)."""
        return min(lam_bb, 1.0 - lam_bb) <= self.lam_margin

    def mixed_backbone_input(self, x, m_bb, lam_bb, perm_bb, plain_mixup):
        """x_bb: plain mixup when `plain_mixup`, else the Mix Block's mix with m_bb (no gradient).
        `plain_mixup` a 0-d bool tensor (the static step): both are made and it picks one."""
        with torch.no_grad():
            if isinstance(plain_mixup, torch.Tensor):  # no host branch on a per-step value
                return torch.where(plain_mixup, blend(x[perm_bb], x, lam_bb), self.mix_block.mix(m_bb, x, perm_bb)[0])
            if plain_mixup:
                return blend(x[perm_bb], x, lam_bb)
            return self.mix_block.mix(m_bb, x, perm_bb)[0]

    def draws(self, x, step: int, total_steps: int, device=None) -> dict:
        """The step's host-side values, a pure function of (seed, step): lam_bb, perm_bb and whether
        x_bb is plain mixup, and on a step that trains the Mix Block also lam_mb, perm_mb and the
        mask-loss weight; permutations on `device` (default x's). `step_loss(x, y, **draws)` is
        the rest of the step."""
        lam_bb, perm_bb = self.draw(x, step, BACKBONE_STREAM, device)
        draws = {"lam_bb": lam_bb, "perm_bb": perm_bb, "plain_mixup": self.plain_mixup(lam_bb)}
        if self.trains_mix_block(step):
            lam_mb, perm_mb = self.draw(x, step, MIX_BLOCK_STREAM, device)  # independent streams
            draws.update(lam_mb=lam_mb, perm_mb=perm_mb, mask_weight=self.mask_weight_at(step, total_steps))
        return draws

    @staticmethod
    def tensor_draws(draws: dict, device) -> dict:
        """The draws with lam_bb and lam_mb as DeviceLambda, mask_weight as a 0-d float32 tensor and
        plain_mixup as a 0-d bool tensor on `device`: what a compiled `step_loss` takes, so a new
        lambda or plain-mixup choice is a new input rather than a recompile (dynamo specializes on
        Python floats and bools): one graph per kind of step, as the static step's."""
        lams = [k for k in ("lam_bb", "lam_mb") if k in draws]
        names = [n for k in lams for n in (k, "partner" + k[3:])] + ["plain_mixup"]
        names += ["mask_weight"] if "mask_weight" in draws else []
        scalars = DeviceScalars(names, device)  # one host->device copy for all of them
        scalars.fill({**{"partner" + k[3:]: 1.0 - draws[k] for k in lams}, **draws,
                      "plain_mixup": float(draws["plain_mixup"])})
        out = {**draws, **{k: DeviceLambda(scalars[k], scalars["partner" + k[3:]]) for k in lams},
               "plain_mixup": scalars["plain_mixup"] > 0}
        if "mask_weight" in draws:
            out["mask_weight"] = scalars["mask_weight"]
        return out

    # The step in parts. The Mix Block branch's terms (l_mix_k, l_mask) reach only the Mix Block,
    # q's two terms only q (x_bb is made without gradient), so each part can be backpropagated
    # before the next is built (forward_backward): the same gradients as one backward of the sum
    # (each tensor's gradient is the same sum of the same contributions), with one backbone
    # graph alive at a time instead of three.
    def mix_block_part(self, x, y, lam_bb, perm_bb, plain_mixup, lam_mb, perm_mb, mask_weight):
        """A step that trains the Mix Block: ({l_mix_k, l_mask}, x_bb, mask logs)."""
        m_mb, m_bb = self.mix_masks(x, lam_mb, perm_mb, lam_bb, perm_bb)
        x_mb, s_mean_mb = self.mix_block.mix(m_mb, x, perm_mb)
        x_bb = self.mixed_backbone_input(x, m_bb, lam_bb, perm_bb, plain_mixup)
        # k's weights need no gradient, but x_mb does: the loss flows through k's activations into the MB.
        l_mix_k = mix_cross_entropy(self.momentum_encoder(x_mb, head="mix"), y, perm_mb, lam_mb, self.smoothing)
        self_weight = 1.0 - s_mean_mb.mean()
        mask_loss = torch.clamp((self_weight - lam_own(lam_mb)).abs() - self.mask_margin, min=0.0)
        logs = {"mask_self_weight": self_weight, **mask_statistics(m_mb, s_mean_mb, lam_mb),
                **self.mix_block.weight_norms()}
        return {"l_mix_k": l_mix_k, "l_mask": mask_weight * mask_loss}, x_bb, logs

    def backbone_mask_part(self, x, lam_bb, perm_bb, plain_mixup):
        """A step that skips the Mix Block branch (mix_block_every > 1): ({}, x_bb, the mask logs
        of m_bb)."""
        f = self.mix_block_features(x)
        with torch.no_grad():
            m_bb = self.mix_block(f, lam_bb, perm_bb)
            s_mean_bb = torch.sigmoid(m_bb.float()).mean(dim=(1, 2, 3))  # exact for nearest upsampling
        x_bb = self.mixed_backbone_input(x, m_bb, lam_bb, perm_bb, plain_mixup)
        logs = {"mask_self_weight": 1.0 - s_mean_bb.mean(), **mask_statistics(m_bb, s_mean_bb, lam_bb),
                **self.mix_block.weight_norms()}
        return {}, x_bb, logs

    def masks_part(self, x, y, lam_bb, perm_bb, plain_mixup, lam_mb=None, perm_mb=None, mask_weight=0.0):
        """The step's first part from its draws: (the Mix Block branch's terms, {} on a step without
        it; x_bb, made without gradient; the mask logs)."""
        if lam_mb is None:
            return self.backbone_mask_part(x, lam_bb, perm_bb, plain_mixup)
        return self.mix_block_part(x, y, lam_bb, perm_bb, plain_mixup, lam_mb, perm_mb, mask_weight)

    def one_q_term(self, x, y, logits=None):
        """L_one_q: q's clean pass (graph-connected to q), or from its head_one `logits`."""
        logits = self.model(x, head="one") if logits is None else logits
        return F.cross_entropy(logits, y, label_smoothing=self.smoothing)

    def mix_q_term(self, x_bb, y, perm_bb, lam_bb, logits=None):
        """L_mix_q: q's pass on x_bb (graph-connected to q), or from its head_mix `logits`."""
        logits = self.model(x_bb, head="mix") if logits is None else logits
        return mix_cross_entropy(logits, y, perm_bb, lam_bb, self.smoothing)

    def batched_q_terms(self, x, x_bb, y, perm_bb, lam_bb):
        """(L_one_q, L_mix_q) from one pass of q over x and x_bb stacked (`q_batched`): BatchNorm's
        batch statistics (and running statistics) span both batches, unlike the official step's
        two passes; the same losses otherwise."""
        one, mix = self.model(torch.cat([x, x_bb]), head=("one", "mix"))
        return self.one_q_term(x, y, one), self.mix_q_term(x_bb, y, perm_bb, lam_bb, mix)

    def q_terms(self, x, x_bb, y, perm_bb, lam_bb):
        """(L_one_q, L_mix_q): q's clean pass, then its pass on x_bb; one pass with `q_batched`."""
        if self.q_batched:
            return self.batched_q_terms(x, x_bb, y, perm_bb, lam_bb)
        l_one_q = self.one_q_term(x, y)
        return l_one_q, self.mix_q_term(x_bb, y, perm_bb, lam_bb)

    @staticmethod
    def assemble(l_mix_q, l_one_q, mb_terms: dict, logs: dict) -> dict[str, torch.Tensor]:
        """The four terms (l_mix_k = l_mask = 0 on a step without the Mix Block branch) and the logs."""
        if not mb_terms:
            zero = torch.zeros((), device=l_one_q.device, dtype=l_one_q.dtype)
            mb_terms = {"l_mix_k": zero, "l_mask": zero.clone()}
        return {"l_mix_q": l_mix_q, "l_one_q": l_one_q, **mb_terms, **logs}

    def terms(self, x, y, lam_bb, perm_bb, plain_mixup, lam_mb=None, perm_mb=None,
              mask_weight=0.0) -> dict[str, torch.Tensor]:
        """The loss terms (graph-connected) and the mask logs from the step's `draws` (lambdas and
        the mask weight as floats, or as the tensors of `tensor_draws`)."""
        mb_terms, x_bb, logs = self.masks_part(x, y, lam_bb, perm_bb, plain_mixup, lam_mb, perm_mb, mask_weight)
        l_one_q, l_mix_q = self.q_terms(x, x_bb, y, perm_bb, lam_bb)
        return self.assemble(l_mix_q, l_one_q, mb_terms, logs)

    def loss_terms(self, x, y, step, total_steps) -> dict[str, torch.Tensor]:
        """The four loss terms of the step (graph-connected) and the mask logs."""
        return self.terms(x, y, **self.draws(x, step, total_steps))

    def mask_weight_at(self, step: int, total_steps: int) -> float:
        if self.mask_anneal != "compound":
            return mask_loss_weight(step, total_steps, self.mask_weight, self.mask_anneal)
        if self._compound is None or self._compound.total != total_steps:
            self._compound = CompoundCosine(self.mask_weight, total_steps)
        return self._compound(step)

    def loss(self, x, y, step, total_steps):
        draws = self.draws(x, step, total_steps)
        if self.compiled_step is None:
            return self.step_loss(x, y, **draws)
        return self.compiled_step(x, y, **self.tensor_draws(draws, x.device))

    def compile_step(self, **options) -> None:
        """From now on `loss` (and `forward_backward`) run torch.compile(step_loss, fullgraph=True,
        **options) on the `tensor_draws`. One graph per kind of step (with or without the Mix Block
        branch): two compiles, none per lambda or plain-mixup choice."""
        self.compiled_step = torch.compile(self.step_loss, fullgraph=True, **options)

    def step_loss(self, x, y, **draws):
        """(loss, logs) of the step from its `draws`: no host work, so torch.compile traces it
        whole (fullgraph=True)."""
        return self.loss_and_logs(self.terms(x, y, **draws))

    def loss_and_logs(self, terms: dict):
        loss = functools.reduce(operator.add, (terms[k] for k in self.summed_terms))  # left to right, as listed
        logs = {k: v.detach() for k, v in terms.items()}
        logs["loss"] = loss.detach()
        return loss, logs

    def forward_backward(self, x, y, step, total_steps, autocast, backward):
        """The step part by part (see mix_block_part): the Mix Block branch's terms backpropagated
        first, then q's clean pass, then q's mixed pass. The compiled step is one graph: one backward."""
        if self.compiled_step is not None:
            return super().forward_backward(x, y, step, total_steps, autocast, backward)
        return self.parts_forward_backward(x, y, autocast, backward, **self.draws(x, step, total_steps))

    def parts_forward_backward(self, x, y, autocast, backward, **draws):
        """(loss, logs) of the step from its draws (floats or buffers), each part backpropagated
        through `backward` as soon as it is built. The parts share one autocast region, so each
        weight is cast once per step as in one backward (autocast keeps its casts until its
        outermost region ends); the backward passes run with autocast off, as outside it."""
        lam_bb, perm_bb = draws["lam_bb"], draws["perm_bb"]

        def backward_outside_autocast(t):
            with torch.autocast(x.device.type, enabled=False):
                backward(t)

        with autocast():
            mb_terms, x_bb, logs = self.masks_part(x, y, **draws)
            if mb_terms:
                backward_outside_autocast(mb_terms["l_mix_k"] + mb_terms["l_mask"])  # frees k's graph on x_mb and the MB's
            if self.q_batched:  # one pass of q over both batches: one backward
                l_one_q, l_mix_q = self.batched_q_terms(x, x_bb, y, perm_bb, lam_bb)
                backward_outside_autocast(l_one_q + l_mix_q)
            else:
                l_one_q = self.one_q_term(x, y)
                backward_outside_autocast(l_one_q)
                l_mix_q = self.mix_q_term(x_bb, y, perm_bb, lam_bb)
                backward_outside_autocast(l_mix_q)
        return self.loss_and_logs(self.assemble(l_mix_q, l_one_q, mb_terms, logs))

    # The static-buffer step: every per-step value in device buffers (see Mixer.static_step).
    static_step = True
    STATIC_SCALARS = ("lam_bb", "partner_bb", "lam_mb", "partner_mb", "plain_mixup", "mask_weight", "ema_weight")

    def step_kind(self, step: int) -> bool:
        """True for a step that trains the Mix Block (a graph of its own)."""
        return self.trains_mix_block(step)

    def static_buffers(self, x) -> dict:
        n = x.shape[0]
        scalars = DeviceScalars(self.STATIC_SCALARS, x.device)
        return {"scalars": scalars, "perms": torch.zeros(2, n, dtype=torch.long, device=x.device)}

    def fill_static(self, buffers: dict, step: int, total_steps: int) -> None:
        """Step `step`'s draws and EMA weight into `buffers`: one copy for the scalars, one for the
        permutations (both from the host; values a step of the other kind does not read are 0)."""
        x_like = buffers["perms"][0]  # draws read only its length and device
        draws = self.draws(x_like, step, total_steps, device="cpu")
        lam_bb, lam_mb = draws["lam_bb"], draws.get("lam_mb", 0.0)
        buffers["scalars"].fill({
            "lam_bb": lam_bb, "partner_bb": 1.0 - lam_bb, "lam_mb": lam_mb, "partner_mb": 1.0 - lam_mb,
            "plain_mixup": float(draws["plain_mixup"]), "mask_weight": draws.get("mask_weight", 0.0),
            "ema_weight": 1.0 - encoder_momentum(step, total_steps, self.momentum_base, self.momentum_end),
        })
        perms = torch.stack([draws["perm_bb"], draws.get("perm_mb", draws["perm_bb"])])
        copy_from_host(buffers["perms"], perms)

    def static_draws(self, buffers: dict, kind: bool) -> dict:
        """The `draws` of a step of `kind`, as views of `buffers`."""
        sc, perms = buffers["scalars"], buffers["perms"]
        draws = {"lam_bb": DeviceLambda(sc["lam_bb"], sc["partner_bb"]), "perm_bb": perms[0],
                 "plain_mixup": sc["plain_mixup"] > 0}
        if kind:
            draws.update(lam_mb=DeviceLambda(sc["lam_mb"], sc["partner_mb"]), perm_mb=perms[1],
                         mask_weight=sc["mask_weight"])
        return draws

    def static_forward_backward(self, x, y, buffers, kind, autocast, backward):
        draws = self.static_draws(buffers, kind)
        if self.compiled_step is None:
            return self.parts_forward_backward(x, y, autocast, backward, **draws)
        with autocast():  # the compiled step is one graph: one backward
            loss, logs = self.compiled_step(x, y, **draws)
        backward(loss)
        return loss.detach(), logs

    @torch.no_grad()
    def static_after_step(self, buffers: dict) -> None:
        self.k_ema.update(self.model, weight=buffers["scalars"]["ema_weight"])

    @staticmethod
    def progress_text(values: dict) -> str:
        """The mask statistics in the progress line: partner weight/target, pixel and image
        spreads, saturated share."""
        if "mask_partner_mean" not in values:
            return ""
        v = values
        # 3 significant digits: a spread of 1e-5 (a flat mask) must not print as 0.000.
        return (f"mask {v['mask_partner_mean']:.2f}/{v['mask_partner_target']:.2f} px-sd {v['mask_pixel_std']:.3g} "
                f"img-sd {v['mask_image_std']:.3g} sat {100 * v['mask_saturated']:.0f}%")

    @torch.no_grad()
    def after_step(self, step, total_steps):
        # theta_k = m theta_k + (1 - m) theta_q; buffers (BN statistics) stay k's own.
        self.k_ema.update(self.model, decay=encoder_momentum(step, total_steps, self.momentum_base, self.momentum_end))

    def eval_heads(self):
        q, k = self.model, self.momentum_encoder
        return {"q_one": (q, "one"), "q_mix": (q, "mix"), "k_one": (k, "one"), "k_mix": (k, "mix")}

    def param_groups(self, lr, weight_decay, min_lr=0.0, mix_block_lr=None, mix_block_min_lr=None,
                     mix_block_weight_decay=None, mix_block_momentum=None, decay_norm_and_bias=False, **_):
        groups = super().param_groups(lr, weight_decay, min_lr, decay_norm_and_bias=decay_norm_and_bias)
        mb = {
            "params": list(self.mix_block.parameters()),
            "lr": lr if mix_block_lr is None else mix_block_lr,
            "min_lr": min_lr if mix_block_min_lr is None else mix_block_min_lr,
            "weight_decay": weight_decay if mix_block_weight_decay is None else mix_block_weight_decay,
            "name": "mix_block",
        }
        if mix_block_momentum is not None:  # SGD momentum of the Mix Block alone (0 in the WRN recipe)
            mb["momentum"] = mix_block_momentum
        groups.append(mb)
        return groups
