"""The Mix Block: a per-pixel mask from a pair of feature maps.

    a = concat(f, lam)          if lam_concat else f           # self
    b = concat(f[perm], 1-lam)  if lam_concat else f[perm]     # partner
    q = W_q a, k = W_q b (N, L, D);  v = W_v b (N, L)
    m = softmax(q k^T / sqrt(D)) v  -> (N, 1, h, w)            # partner-weight logits

The 1x1 convs commute with the batch permutation and a constant lam channel is a per-sample
bias, so W f is computed once for the whole batch, gathered for the partner, and the lam
terms are added as biases: the same numbers as the concatenated form with less work.

`init` picks how the attention starts (measured in docs/QUALITY.md). The official N(0, 0.01) W_q
gives logits q k^T / sqrt(D) ~ 1e-2: the softmax is uniform, every pixel gets the same mask
value, and W_q's gradient is proportional to W_q itself, a saddle that weight decay holds it on.
`scaled` draws W_q from N(0, 1/C) (LeCun), so the logits start O(1); `cosine` normalises q and
k and multiplies by a learnable temperature tau = exp(log_tau) (from 10, at most 100, as Swin
V2's cosine attention), so the logits span +-tau whatever W_q's scale. `cosine-centered` first
subtracts each image's mean q (and k) over its positions: q_i - mean_i q, the same for k. The
plain `cosine` has a trap this removes (measured, docs/QUALITY.md): q = W_q f_i + b, and once
the bias b or the part of f common to all positions dominates q, every normalised q_i is the same
vector, the logits are equal across keys, the softmax is uniform again and W_q gets no gradient
(seed 1 of the study: cos(q_i, q_i') = 1.0000 from step 50 on). Centred, q and k hold only what
varies across positions, which is what a spatial mask is made of; the bias and the lam terms of
`lam_concat` cancel out of q and k (v keeps its lam term). W_v keeps N(0, 0.01) in all of
them: the masks still start at ~0.5.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from automix_fast import ops
from automix_fast.config.sections import MIX_BLOCK_INITS

from .base import lam_own, lam_partner, scaled

COSINE_TEMPERATURE = 10.0  # tau at the start of `cosine` and `cosine-centered`
COSINE_MAX_TEMPERATURE = 100.0  # clamp, so a runaway tau cannot make the softmax one-hot


class MixBlock(nn.Module):
    def __init__(self, in_channels: int, *, lam_concat: bool = False, mode: str = "nearest", backend: str = "auto",
                 init: str = "official"):
        super().__init__()
        if mode not in ops.MODES:
            raise ValueError(f"mask mode must be one of {ops.MODES}, got {mode!r}")
        if init not in MIX_BLOCK_INITS:
            raise ValueError(f"Mix Block init must be one of {MIX_BLOCK_INITS}, got {init!r}")
        self.init = init
        self.in_channels = in_channels
        self.dim = max(in_channels // 2, 1)
        self.lam_concat = lam_concat
        self.mode = mode
        self.backend = backend
        c_in = in_channels + int(lam_concat)
        self.q_proj = nn.Conv2d(c_in, self.dim, 1, bias=True)  # W_q, shared by q and k
        self.v_proj = nn.Conv2d(c_in, 1, 1, bias=True)  # W_v
        for conv in (self.q_proj, self.v_proj):
            nn.init.normal_(conv.weight, 0.0, 0.01)  # first masks ~0.5 everywhere
            nn.init.zeros_(conv.bias)
        if init == "scaled":  # q's entries O(1): the attention is not uniform from step 0
            nn.init.normal_(self.q_proj.weight, 0.0, c_in**-0.5)
        if init.startswith("cosine"):
            self.log_temperature = nn.Parameter(torch.tensor(math.log(COSINE_TEMPERATURE)))

    def project(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_q f (N, L, D) and W_v f (N, L) for the whole batch, once per step: both of the step's
        masks gather from these (the 1x1 convs commute with the permutation)."""
        n, c, h, w = f.shape
        if c != self.in_channels:
            raise ValueError(f"Mix Block expects {self.in_channels} feature channels, got {c}")
        feat = f.flatten(2).transpose(1, 2)  # (N, L, C); a free view for channels-last f
        weight = torch.cat([self.q_proj.weight.flatten(1)[:, :c], self.v_proj.weight.flatten(1)[:, :c]])
        bias = torch.cat([self.q_proj.bias, self.v_proj.bias])
        # Zero rows pad the output to a multiple of 16 columns, so the q view's row stride is
        # 16-element aligned and the attention kernel's q loads vectorize.
        pad = -(self.dim + 1) % 16
        weight = torch.nn.functional.pad(weight, (0, 0, 0, pad))
        bias = torch.nn.functional.pad(bias, (0, pad))
        proj = torch.nn.functional.linear(feat, weight, bias)  # (N, L, D + 1 + pad); autocast keeps bf16/fp16
        return proj[..., : self.dim], proj[..., self.dim]

    def attend(self, projected, lam, perm: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, 1, h, w) float32 from projected features, for partners f[perm]."""
        q, k, v, scale = self.attention_inputs(projected, lam, perm)
        logits = ops.mixblock_attention(q, k, v, scale, backend=self.backend)  # (N, L) float32
        return logits.view(q.shape[0], 1, *size)

    def attention_inputs(self, projected, lam, perm: torch.Tensor):
        """(q, k, v, scale) as the attention kernel gets them: softmax(scale q k^T) v, where
        scale None is 1/sqrt(D). Also read by bench/mix_block_attention.py's diagnostics."""
        q_all, v_all = projected
        q, k, v = q_all, q_all[perm], v_all[perm]
        if self.lam_concat:  # the lam channel of concat(f, lam) as a per-sample bias, in q's dtype
            c = self.in_channels
            w_lam = self.q_proj.weight[:, c, 0, 0].to(q.dtype)
            q = q + scaled(lam_own(lam), w_lam)
            k = k + scaled(lam_partner(lam), w_lam)
            v = v + scaled(lam_partner(lam), self.v_proj.weight[0, c, 0, 0].to(v.dtype))
        scale = None  # the default 1/sqrt(D)
        if self.init == "cosine-centered":  # only what varies across an image's positions
            q, k = q - q.mean(dim=1, keepdim=True), k - k.mean(dim=1, keepdim=True)
        if self.init.startswith("cosine"):  # tau cos(q, k): the temperature rides on q, the kernel's scale is 1
            # Normalised (and scaled by tau) in float32, then rounded once to the input dtype: CUDA
            # autocast runs norm in float32, so F.normalize of a bf16 q would come back float32 there
            # while v stays bf16, and the kernel takes q, k and v in one dtype.
            dtype = q.dtype
            tau = self.log_temperature.clamp(max=math.log(COSINE_MAX_TEMPERATURE)).exp()
            q = (F.normalize(q.float(), dim=-1) * tau).to(dtype)
            k, scale = F.normalize(k.float(), dim=-1).to(dtype), 1.0
        return q, k, v, scale

    def forward(self, f: torch.Tensor, lam, perm: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, 1, h, w) float32 for mixing each sample with its partner f[perm]."""
        return self.attend(self.project(f), lam, perm, tuple(f.shape[-2:]))

    @torch.no_grad()
    def weight_norms(self) -> dict[str, torch.Tensor]:
        """L2 norms of W_q and W_v (device scalars): near their init (~0.01 sqrt(size)) the masks
        are still ~0.5 everywhere; W_v's norm sets how far the logits can move from 0."""
        norms = {"mix_block_q_norm": torch.linalg.vector_norm(self.q_proj.weight.detach().float()),
                 "mix_block_v_norm": torch.linalg.vector_norm(self.v_proj.weight.detach().float())}
        if self.init.startswith("cosine"):
            norms["mix_block_temperature"] = self.log_temperature.detach().float().exp()
        return norms

    def mix(self, logits: torch.Tensor, x: torch.Tensor, perm: torch.Tensor):
        """(x_mix, s_mean): blend x with x[perm] by s = sigmoid(upsample(logits))."""
        return ops.mask_mix(logits, x, perm, mode=self.mode, backend=self.backend)
