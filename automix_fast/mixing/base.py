"""What every mixing policy shares: the mixed-label loss, per-step random draws, the base class."""
from __future__ import annotations

from typing import Callable, ContextManager, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from automix_fast.engine.model_ema import ModelEma
from automix_fast.engine.optim import param_groups_weight_decay


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor `t` on `device` without the host waiting for the device: to CUDA it is copied
    from pinned memory with non_blocking (to stage a copy from pageable memory the driver may wait
    for every kernel already queued on the stream, which takes away the host's lead over the
    GPU); the caching host allocator keeps the pinned buffer until the copy has run. The values
    are `t`'s; to the CPU it is `t` itself."""
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory()  # `t` itself when already pinned
    return t.to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- host tensor `src`, without the host waiting for the device (see `to_device`)."""
    dst.copy_(src.pin_memory() if dst.device.type == "cuda" else src, non_blocking=True)


class DeviceLambda(NamedTuple):
    """A step's lambda held on the device, for a step whose per-step values are tensors (the
    static-buffer step, the compiled step): `own` = lam and `partner` = 1 - lam as 0-d float32
    tensors, both rounded from the host's float64 values. Every use below rounds them as the
    host float's use does, so a step fed a DeviceLambda computes the same numbers bit for bit."""

    own: torch.Tensor
    partner: torch.Tensor


def lam_own(lam):
    """lam as a float or a 0-d tensor."""
    return lam.own if isinstance(lam, DeviceLambda) else lam


def lam_partner(lam):
    """1 - lam, as a float or a 0-d tensor."""
    return lam.partner if isinstance(lam, DeviceLambda) else 1.0 - lam


def scaled(weight, t: torch.Tensor) -> torch.Tensor:
    """weight * t in t's dtype, rounded once from float32 as `float * t` rounds for a float
    `weight`, also when `weight` is a 0-d float32 tensor (which alone would round to t's dtype first)."""
    if isinstance(weight, torch.Tensor) and t.dtype != weight.dtype:
        return (weight * t.float()).to(t.dtype)
    return weight * t


def blend(partner: torch.Tensor, x: torch.Tensor, lam) -> torch.Tensor:
    """lerp(partner, x, lam) = partner + lam (x - partner) for a float or DeviceLambda lam, in x's
    dtype and memory format, rounded once from float32 in both cases."""
    if not isinstance(lam, DeviceLambda):
        return torch.lerp(partner, x, lam)
    if x.dtype == torch.float32:
        return torch.lerp(partner, x, lam.own)
    return torch.lerp(partner.float(), x.float(), lam.own).to(x.dtype)


def mix_cross_entropy(logits, y, perm, lam: "float | DeviceLambda | torch.Tensor", smoothing: float = 0.0):
    """mixCE = lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm]); a tensor `lam` holds one
    lambda per sample (timm's elem/pair modes) and weighs each sample's two terms."""
    if isinstance(lam, torch.Tensor):
        ce_y = F.cross_entropy(logits, y, label_smoothing=smoothing, reduction="none")
        ce_p = F.cross_entropy(logits, y[perm], label_smoothing=smoothing, reduction="none")
        return torch.lerp(ce_p, ce_y, lam.to(ce_y.dtype)).mean()
    return lam_own(lam) * F.cross_entropy(logits, y, label_smoothing=smoothing) + lam_partner(lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=smoothing
    )


class DeviceScalars:
    """Named 0-d float32 tensors on one device, views of one vector, refilled together by one
    host->device copy (from pinned memory on CUDA: no wait on the device's queue). A value is
    rounded from the host's float64 to float32 as a float operand of a tensor op is."""

    def __init__(self, names: "tuple[str, ...]", device):
        self.names = tuple(names)
        self.device = torch.device(device)
        self.vector = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)
        self.views = {n: self.vector[i] for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]

    def fill(self, values: "dict[str, float]") -> None:
        """Set every name (a missing one is an error: a stale value must not survive a step)."""
        host = torch.tensor([float(values[n]) for n in self.names], dtype=torch.float32,
                            pin_memory=self.device.type == "cuda")
        self.vector.copy_(host, non_blocking=True)


class StepRandom:
    """Random draws that are a pure function of (seed, step, stream[, rank]).

    Nothing to checkpoint: a resumed run draws the same lambdas and permutations as an
    uninterrupted one. Lambdas come from numpy on the host (no device sync to read them);
    permutations from a CPU torch generator and are copied to the batch's device by `to_device`
    (asynchronously: no wait on the device).
    """

    def __init__(self, seed: int, rank: int = 0):
        self.seed = int(seed)
        self.rank = int(rank)

    def beta(self, alpha: float, step: int, stream: int) -> float:
        # Shared across ranks: every rank mixes with the same lambda.
        return float(np.random.default_rng([self.seed, step, stream]).beta(alpha, alpha))

    def uniform(self, step: int, stream: int, size: int = 1) -> np.ndarray:
        return np.random.default_rng([self.seed, step, stream, 1]).random(size)

    def per_sample(self, step: int, stream: int, per_rank: bool = True) -> np.random.Generator:
        """A generator for one step's per-sample draws: per rank, as each rank mixes its own
        shard, or (per_rank=False) the same on every rank, as the per-batch draws."""
        return np.random.default_rng([self.seed, step, stream, 2] + ([self.rank] if per_rank else []))

    def pair(self, alpha: float, n: int, step: int, stream: int, device) -> tuple[float, torch.Tensor]:
        """(lambda, permutation) of one mix: what every mixing policy draws per step and stream."""
        return self.beta(alpha, step, stream), self.perm(n, step, stream, device)

    def perm(self, n: int, step: int, stream: int, device) -> torch.Tensor:
        # Per rank: each rank pairs the images of its own shard.
        g = torch.Generator().manual_seed(hash((self.seed, step, stream, self.rank)) & 0x7FFF_FFFF_FFFF)
        return to_device(torch.randperm(n, generator=g), device)


class Mixer(nn.Module):
    """A mixing policy wrapping the online model `model`: the interface every policy provides.

    - loss(x, y, step, total_steps) -> (loss, logs), logs holding detached device scalars;
    - after_step(step, total_steps) runs after each optimizer step (default: the model EMA's update);
    - eval_heads() names the (encoder, head) pairs evaluated at the end of an epoch;
    - param_groups(lr, weight_decay, min_lr, ...) -> the optimizer's parameter groups;
    - progress_text(values) -> the policy's note on the progress line (default None: no note);
    - summed_terms: the logged values `loss` is the sum of (default (): loss is one term);
    - mix_alpha(kind) -> the Beta alpha the policy draws lambda with for `kind` ("automix",
      "mixup" or "cutmix"), or None (the default: it draws none for that kind);
    - momentum_encoder: the momentum (EMA) encoder k, or None (the default: no momentum encoder);
    - mix_block: the learned Mix Block, or None (the default: a fixed mixing rule);
    - model_ema: timm's EMA copy of the model (head `ema`), updated by `ema` (a ModelEma), both
      None until `enable_model_ema(decay)` adds them (the baselines only);
    - forward_backward(x, y, step, total_steps, autocast, backward) -> (loss, logs): what the
      training loop calls (default: `loss` under autocast, then one backward);
    - the static-buffer step (`static_step`, `step_kind`, `static_buffers`, `fill_static`,
      `static_forward_backward`, `static_after_step`): the same step reading its per-step values
      from device buffers, for policies with `static_step` (all of this package's).
    """

    name = "base"
    summed_terms: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, *, seed: int = 0, rank: int = 0, smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.random = StepRandom(seed, rank)
        self.smoothing = smoothing
        self.momentum_encoder = None
        self.mix_block = None
        self.model_ema = None
        self.ema: ModelEma | None = None  # the update rule of model_ema

    def enable_model_ema(self, decay: float, warmup: bool = False) -> None:
        if self.momentum_encoder is not None:
            raise ValueError("AutoMix's momentum encoder is its EMA model; model EMA is for the baselines")
        self.ema = ModelEma(self.model, decay, warmup=warmup)
        self.model_ema = self.ema.module

    def mix_alpha(self, kind: str) -> float | None:
        return None

    @property
    def label(self) -> str:
        """The policy as the run header names it (with its settings where the name is not enough)."""
        return self.name + self.ema_label

    @property
    def ema_label(self) -> str:
        if self.model_ema is None:
            return ""
        return f" + model EMA {self.ema.decay:g}" + (" (warm-up)" if self.ema.warmup else "")

    def loss(self, x, y, step: int, total_steps: int):
        raise NotImplementedError

    def forward_backward(self, x, y, step: int, total_steps: int, autocast: Callable[[], ContextManager],
                         backward: Callable[[torch.Tensor], None]):
        """One micro-batch's forward and backward: the loss computed under `autocast()`, then
        `backward(loss)` (which scales and backpropagates it). Returns (loss detached, logs), the
        same values as `loss`. A policy whose loss is a sum of parts with disjoint graphs may
        backpropagate them one at a time (AutoMix does), freeing each part's graph before the next
        is built: the same gradients, a lower peak of memory."""
        with autocast():
            loss, logs = self.loss(x, y, step, total_steps)
        backward(loss)
        return loss.detach(), logs

    # The static-buffer step (engine/static_step.py; what --cuda-graph captures). A policy with
    # `static_step` reads every per-step value (lambdas, permutations, weights) from device
    # buffers it allocates once and refills before each step, and its step runs the same
    # operations whatever the values: steps differ only by `step_kind`, one captured graph each.
    static_step = False

    def step_kind(self, step: int):
        """Steps of one kind run the same operations (default: all steps are alike)."""
        return None

    def static_buffers(self, x) -> dict:
        """The device buffers the static step reads (allocated once, for batches like `x`)."""
        return {"scalars": DeviceScalars(("ema_weight",) if self.ema is not None else (), x.device)}

    def fill_static(self, buffers: dict, step: int, total_steps: int) -> None:
        """Write step `step`'s per-step values into `buffers` (no device read)."""
        buffers["scalars"].fill(self.ema_values(step))

    def ema_values(self, step: int) -> dict:
        """The model EMA's per-step value after step `step`, as the static buffers hold it: the lerp
        weight 1 - decay, rounded from float64 as the float update's (none without model EMA)."""
        return {"ema_weight": 1.0 - self.ema.get_decay(step + 1)} if self.ema is not None else {}

    def static_forward_backward(self, x, y, buffers: dict, kind, autocast, backward):
        """`forward_backward` of a step of `kind` reading its per-step values from `buffers`."""
        raise NotImplementedError(f"{self.name} has no static-buffer step")

    def static_after_step(self, buffers: dict) -> None:
        """`after_step` reading its per-step values from `buffers`."""
        if self.ema is not None:
            self.ema.update(self.model, weight=buffers["scalars"]["ema_weight"])

    def progress_text(self, values: dict) -> str | None:
        """The policy's note on the progress line from the interval's logged means; None: no note."""
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step + 1)

    def eval_heads(self) -> dict[str, tuple[nn.Module, str]]:
        """name -> (encoder, head) evaluated at the end of each epoch; the first is the main one."""
        heads = {"one": (self.model, "one")}
        if self.model_ema is not None:
            heads["ema"] = (self.model_ema, "one")
        return heads

    def head_parameters(self) -> list[nn.Parameter]:
        """The trained model's classifier heads' parameters (head_one, and head_mix where it has
        one): what timm's --clip-mode agc leaves out."""
        heads = (getattr(self.model, name, None) for name in ("head_one", "head_mix"))
        return [p for head in heads if head is not None for p in head.parameters()]

    def param_groups(self, lr: float, weight_decay: float, min_lr: float = 0.0, decay_norm_and_bias: bool = False,
                     **_) -> list[dict]:
        groups = param_groups_weight_decay(self.model, weight_decay, decay_all=decay_norm_and_bias)
        for g in groups:
            g.update(lr=lr, min_lr=min_lr, name=g.get("name", "model"))
        return groups
