"""AutoMix: a learned Mix Block trained through a momentum encoder (DESIGN §1.1, §1.3).

One step:
  1. lam_mb, lam_bb ~ Beta(alpha, alpha); independent permutations perm_mb, perm_bb.
  2. f = k.stage3(x) without gradients (k in train mode: batch statistics, its own BN stats).
  3. m_mb = MB(f, lam_mb, perm_mb) keeps its gradient; m_bb = MB(f, lam_bb, perm_bb) detached.
  4. x_bb: plain mixup when min(lam_bb, 1 - lam_bb) <= 0.08, else the MB mix with m_bb;
     x_mb: the MB mix with m_mb (differentiable w.r.t. m_mb).
  5. L_mix_k = mixCE(k.head_mix(k(x_mb)), y, perm_mb, lam_mb)  -> gradient reaches the MB only
     L_one_q = CE(q.head_one(q(x)), y);  L_mix_q = mixCE(q.head_mix(q(x_bb)), y, perm_bb, lam_bb)
     L_mask  = w_mask(t) * max(|1 - mean(s_mb) - lam_mb| - margin, 0)
  6. loss = L_mix_q + L_one_q + L_mix_k + L_mask; after the optimizer step, the EMA update
     theta_k = m theta_k + (1 - m) theta_q over parameters (not buffers).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from automix_fast.engine.schedule import cosine_anneal

from .base import Mixer, mix_cross_entropy
from .mixblock import MixBlock


def encoder_momentum(step: int, total_steps: int, base: float = 0.999, end: float = 0.99999) -> float:
    """base for the first 10% of training, then end - (end - base) (cos(pi t / T) + 1) / 2."""
    if total_steps <= 0 or step < 0.1 * total_steps:
        return base
    return cosine_anneal(base, end, step, total_steps)


def mask_loss_weight(step: int, total_steps: int, weight: float, anneal: bool) -> float:
    """w_mask, cosine-annealed to 0 over training when `anneal` (ImageNet recipes)."""
    if not anneal or total_steps <= 0:
        return weight
    return cosine_anneal(weight, 0.0, step, total_steps)


class AutoMix(Mixer):
    name = "automix"

    def __init__(
        self,
        model,
        *,
        alpha: float = 2.0,
        momentum_base: float = 0.999,
        momentum_end: float = 0.99999,
        mask_loss_weight: float = 0.1,
        mask_loss_anneal: bool = False,
        mask_margin: float = 0.1,
        lam_margin: float = 0.08,
        lam_concat: bool = False,
        mask_mode: str = "nearest",
        mix_stage: int | None = None,
        kernel_backend: str = "auto",
        **kw,
    ):
        super().__init__(model, **kw)
        if getattr(model, "head_mix", None) is None:
            raise ValueError("AutoMix needs a model built with mix_head=True")
        self.alpha = alpha
        self.momentum_base, self.momentum_end = momentum_base, momentum_end
        self.mask_weight, self.mask_anneal, self.mask_margin = mask_loss_weight, mask_loss_anneal, mask_margin
        self.lam_margin = lam_margin
        self.mix_stage = mix_stage or model.mix_stage
        # k: a copy of q that gets no weight gradients. It is a submodule, so it follows the
        # policy's train()/eval(): train mode (batch statistics, its own BN running stats) while
        # training, eval mode for evaluation.
        self.momentum_encoder = copy.deepcopy(model).requires_grad_(False)
        self.mix_block = MixBlock(
            model.stage_channels[self.mix_stage - 1], lam_concat=lam_concat, mode=mask_mode, backend=kernel_backend
        )

    def mix_masks(self, x, lam_mb, perm_mb, lam_bb, perm_bb):
        """Mask logits for the MB branch (with gradient) and the backbone branch (detached)."""
        with torch.no_grad():
            f = self.momentum_encoder.forward_features(x, stages=self.mix_stage)
        size = tuple(f.shape[-2:])
        projected = self.mix_block.project(f)  # once for both masks
        m_mb = self.mix_block.attend(projected, lam_mb, perm_mb, size)
        with torch.no_grad():
            m_bb = self.mix_block.attend(tuple(t.detach() for t in projected), lam_bb, perm_bb, size)
        return m_mb, m_bb

    def loss_terms(self, x, y, step, total_steps) -> dict[str, torch.Tensor]:
        """The four loss terms of the step (graph-connected) and the mask's self weight."""
        n = x.shape[0]
        lam_mb, perm_mb = self.random.pair(self.alpha, n, step, 0, x.device)  # independent streams
        lam_bb, perm_bb = self.random.pair(self.alpha, n, step, 1, x.device)
        m_mb, m_bb = self.mix_masks(x, lam_mb, perm_mb, lam_bb, perm_bb)

        x_mb, s_mean_mb = self.mix_block.mix(m_mb, x, perm_mb)
        with torch.no_grad():
            if min(lam_bb, 1.0 - lam_bb) <= self.lam_margin:  # lam is a host float: no device sync
                x_bb = torch.lerp(x[perm_bb], x, lam_bb)
            else:
                x_bb, _ = self.mix_block.mix(m_bb, x, perm_bb)

        # k's weights need no gradient, but x_mb does: the loss flows through k's activations into the MB.
        l_mix_k = mix_cross_entropy(self.momentum_encoder(x_mb, head="mix"), y, perm_mb, lam_mb, self.smoothing)
        l_one_q = F.cross_entropy(self.model(x, head="one"), y, label_smoothing=self.smoothing)
        l_mix_q = mix_cross_entropy(self.model(x_bb, head="mix"), y, perm_bb, lam_bb, self.smoothing)
        self_weight = 1.0 - s_mean_mb.mean()
        mask_loss = torch.clamp((self_weight - lam_mb).abs() - self.mask_margin, min=0.0)
        l_mask = mask_loss_weight(step, total_steps, self.mask_weight, self.mask_anneal) * mask_loss
        return {"l_mix_q": l_mix_q, "l_one_q": l_one_q, "l_mix_k": l_mix_k, "l_mask": l_mask,
                "mask_self_weight": self_weight, "lam_mb": lam_mb}

    def loss(self, x, y, step, total_steps):
        terms = self.loss_terms(x, y, step, total_steps)
        loss = terms["l_mix_q"] + terms["l_one_q"] + terms["l_mix_k"] + terms["l_mask"]
        logs = {k: v.detach() for k, v in terms.items() if k != "lam_mb"}
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def after_step(self, step, total_steps):
        m = encoder_momentum(step, total_steps, self.momentum_base, self.momentum_end)
        k_params = list(self.momentum_encoder.parameters())
        q_params = list(self.model.parameters())
        # theta_k = m theta_k + (1 - m) theta_q; buffers (BN statistics) stay k's own.
        torch._foreach_lerp_(k_params, q_params, 1.0 - m)

    def eval_heads(self):
        q, k = self.model, self.momentum_encoder
        return {"q_one": (q, "one"), "q_mix": (q, "mix"), "k_one": (k, "one"), "k_mix": (k, "mix")}

    def param_groups(self, lr, weight_decay, min_lr=0.0, mix_block_lr=None, mix_block_min_lr=None,
                     mix_block_weight_decay=None, **_):
        groups = super().param_groups(lr, weight_decay, min_lr)
        groups.append(
            {
                "params": list(self.mix_block.parameters()),
                "lr": lr if mix_block_lr is None else mix_block_lr,
                "min_lr": min_lr if mix_block_min_lr is None else mix_block_min_lr,
                "weight_decay": weight_decay if mix_block_weight_decay is None else mix_block_weight_decay,
                "name": "mix_block",
            }
        )
        return groups
