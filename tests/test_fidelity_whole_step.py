"""A whole AutoMix training step of the engine against an independent plain-torch transcription
of the official OpenMixup step (AutoMixup.forward_train with PixelMixBlock, the total loss's
backward, an SGD update, then the momentum hook's k update), on deep copies of the same q, k
and Mix Block weights with the same lambdas and permutations.

Compared after each step: the four loss terms and their sum, every gradient (q's backbone and
both heads, the Mix Block), q's updated parameters, k's momentum-updated parameters and the BN
running statistics of q and k. float32, the engine's torch reference ops.

The transcription follows the official code with its defaults that the recipes keep (reduction
2, use_scale, mask_loss_mode L1, no mask_adjust, no pre-MixBlock heads, head weights 1, the k
backbone's full forward on the clean batch). The official Mix Block forces float32 around its
attention and sigmoid, so the step is compared in float32 (a float64 model would still meet
float32 there on both sides).
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from automix_fast.mixing import build_mixer
from automix_fast.models import create_model
from mixkit import batch

MOMENTUM_BASE, MOMENTUM_END = 0.9, 0.999  # a k update that moves k visibly in one step
MASK_LOSS, MASK_MARGIN, LAM_MARGIN = 0.1, 0.1, 0.08  # the official CIFAR / Tiny-ImageNet values
LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
TOTAL_STEPS = 100
# float32 results of two computation orders (the engine's projection, lerp and split backward
# against the official convolutions, products and one backward).
LOSS_ATOL = 2e-6
GRAD_ATOL, GRAD_RTOL = 2e-6, 1e-4
PARAM_ATOL = 1e-6
STAT_ATOL = 1e-6


# ---------------------------------------------------------------- the official step, transcribed


def official_backbone(model, x, mask_layer_stage):
    """backbone(img) with out_indices (mix stage, last): every stage runs (BN statistics of all)."""
    h = model.stem(x)
    feature = None
    for i, stage in enumerate(model.stages, start=1):
        h = stage(h)
        if i == mask_layer_stage:
            feature = h
    return feature, h


def official_cls_head(linear, feat):
    """ClsHead / ClsMixupHead with_avg_pool: AdaptiveAvgPool2d(1) + fc."""
    return F.linear(F.adaptive_avg_pool2d(feat, 1).flatten(1), linear.weight, linear.bias)


def official_mix_ce(logits, y, index, lam):
    """ClsMixupHead.loss with (y, y[index], lam): CE(y) * lam + CE(y[index]) * (1 - lam)."""
    return F.cross_entropy(logits, y) * lam + F.cross_entropy(logits, y[index]) * (1 - lam)


def official_pixel_mix_block(mb, feat, lam, index, scale_factor, mode, lam_concat):
    """PixelMixBlock.forward: mask (N, 2, H, W) = [1 - s, s], s the partner weight."""
    n, _, h, w = feat.shape
    x_lam, x_lam_ = feat, feat[index, :]
    if lam_concat:
        lam_block = torch.zeros(n, 1, h, w).to(x_lam)
        lam_block[:] = lam
        x_lam = torch.cat([x_lam, lam_block], dim=1)
        x_lam_ = torch.cat([x_lam_, 1 - lam_block], dim=1)
    v_ = F.conv2d(x_lam_, mb["value.weight"], mb["value.bias"]).view(n, 1, -1).permute(0, 2, 1)
    inter = mb["query.weight"].shape[0]
    q_x = F.conv2d(x_lam, mb["query.weight"], mb["query.bias"]).view(n, inter, -1).permute(0, 2, 1)
    k_x = F.conv2d(x_lam_, mb["query.weight"], mb["query.bias"]).view(n, inter, -1)
    pairwise = torch.matmul(q_x.type(torch.float32), k_x.type(torch.float32)).type(torch.float32)
    pairwise = pairwise / q_x.shape[-1] ** 0.5  # use_scale
    pairwise = pairwise.type(torch.float32).softmax(dim=-1)
    mask_lam_ = torch.matmul(pairwise.type(torch.float32), v_.type(torch.float32)).view(n, 1, h, w)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    mask_lam_ = F.interpolate(mask_lam_, scale_factor=scale_factor, mode=mode, **extra)
    mask_lam_ = torch.sigmoid(mask_lam_.type(torch.float32))
    return torch.cat([1 - mask_lam_, mask_lam_], dim=1)


def official_mask_loss(mask, lam):
    """PixelMixBlock.mask_loss, mode L1, with the margin."""
    n, _, h, w = mask.size()
    m_mean = mask[:, 1, :, :].unsqueeze(1).sum() / (n * h * w)
    return torch.clamp(torch.abs(1 - m_mean - lam) - MASK_MARGIN, min=0.0).mean()


def official_forward_train(side, x, y, lam, index_mb, index_bb, mode, lam_concat):
    """AutoMixup.forward_train: the four terms, in the order the official sum adds them."""
    q, k, mb = side["q"], side["k"], side["mb"]
    lam_mb, lam_bb = lam
    feature, _ = official_backbone(k, x, k.mix_stage)
    scale_factor = x.shape[3] // feature.shape[3]  # CIFAR version: 2 ** mask_layer
    mask_mb = official_pixel_mix_block(mb, feature, lam_mb, index_mb, scale_factor, mode, lam_concat)
    mask_bb = official_pixel_mix_block(mb, feature, lam_bb, index_bb, scale_factor, mode, lam_concat).clone().detach()
    if LAM_MARGIN >= lam_bb or LAM_MARGIN >= 1 - lam_bb:
        mask_bb[:, 0, :, :] = lam_bb
        mask_bb[:, 1, :, :] = 1 - lam_bb
    mask_loss = official_mask_loss(mask_mb, lam_mb) * MASK_LOSS
    img_mix_mb = x * mask_mb[:, 0, :, :].unsqueeze(1) + x[index_mb, :] * mask_mb[:, 1, :, :].unsqueeze(1)
    img_mix_bb = x * mask_bb[:, 0, :, :].unsqueeze(1) + x[index_bb, :] * mask_bb[:, 1, :, :].unsqueeze(1)
    # forward_k, then forward_q (one, then mix): the BN statistics see the batches in this order
    loss_mix_k = official_mix_ce(official_cls_head(k.head_mix, official_backbone(k, img_mix_mb, 0)[1]).float(),
                                 y, index_mb, lam_mb)
    loss_one_q = F.cross_entropy(official_cls_head(q.head_one, official_backbone(q, x, 0)[1]), y)
    loss_mix_q = official_mix_ce(official_cls_head(q.head_mix, official_backbone(q, img_mix_bb, 0)[1]).float(),
                                 y, index_bb, lam_bb)
    loss = loss_mix_q * 1.0
    loss = loss + loss_one_q * 1.0
    loss = loss + loss_mix_k * 1.0
    loss = loss + mask_loss
    return loss, {"l_mix_q": loss_mix_q, "l_one_q": loss_one_q, "l_mix_k": loss_mix_k, "l_mask": mask_loss}


def official_momentum(step):
    """CosineScheduleHook.before_train_iter at cur_iter = step (adjust_scope 1)."""
    return MOMENTUM_END - (MOMENTUM_END - MOMENTUM_BASE) * (math.cos(math.pi * step / TOTAL_STEPS) + 1) / 2


@torch.no_grad()
def official_momentum_update(q, k, m):
    """AutoMixup.momentum_update: parameters only (backbone and both heads), buffers stay k's."""
    for param_q, param_k in zip(q.parameters(), k.parameters()):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


# ---------------------------------------------------------------- the two sides


def make_engine(mode, lam_concat):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    mixer = build_mixer("automix", model, seed=1, kernel_backend="torch", alpha=2.0, momentum_base=MOMENTUM_BASE,
                        momentum_end=MOMENTUM_END, mask_loss_weight=MASK_LOSS, mask_loss_anneal="none",
                        mask_margin=MASK_MARGIN, lam_margin=LAM_MARGIN, lam_concat=lam_concat, mask_mode=mode,
                        k_full_forward=True, mix_block_init="official", mix_block_every=1, q_batched=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # A trained-looking state: k apart from q, a Mix Block whose masks vary over pixels and
        # images, BN running statistics away from their init.
        for p in mixer.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in mixer.mix_block.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for bn in [m for m in mixer.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(1 + 0.1 * torch.rand(bn.running_var.shape, generator=g))
    mixer.train()
    return mixer


def official_side(mixer):
    """Deep copies of q, k and the Mix Block weights under the official names."""
    q = copy.deepcopy(mixer.model).train()
    k = copy.deepcopy(mixer.momentum_encoder).train()
    for p in k.parameters():
        p.requires_grad_(False)  # the official k: `param_k.requires_grad = False`
    blk = mixer.mix_block
    names = {"query.weight": blk.q_proj.weight, "query.bias": blk.q_proj.bias,
             "value.weight": blk.v_proj.weight, "value.bias": blk.v_proj.bias}
    mb = {name: p.detach().clone().requires_grad_(True) for name, p in names.items()}
    return {"q": q, "k": k, "mb": mb}


def engine_mb_params(mixer):
    blk = mixer.mix_block
    return {"query.weight": blk.q_proj.weight, "query.bias": blk.q_proj.bias,
            "value.weight": blk.v_proj.weight, "value.bias": blk.v_proj.bias}


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)


def engine_step(mixer, opt, x, y, step, draws):
    """One engine step through forward_backward with the draws injected, then the optimizer and
    the momentum update (EagerStep's order)."""
    mixer.draw = lambda x_, step_, stream, device=None: draws[stream]
    opt.zero_grad(set_to_none=True)
    _, logs = mixer.forward_backward(x, y, step, TOTAL_STEPS, contextlib.nullcontext, lambda t: t.backward())
    grads = {name: p.grad.clone() for name, p in mixer.model.named_parameters()}
    grads.update({name: p.grad.clone() for name, p in engine_mb_params(mixer).items()})
    opt.step()
    mixer.after_step(step, TOTAL_STEPS)
    return logs, grads


def official_step(side, opt, x, y, step, lam, index_mb, index_bb, mode, lam_concat):
    opt.zero_grad(set_to_none=True)
    loss, terms = official_forward_train(side, x, y, lam, index_mb, index_bb, mode, lam_concat)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in side["q"].named_parameters()}
    grads.update({name: p.grad.clone() for name, p in side["mb"].items()})
    opt.step()
    official_momentum_update(side["q"], side["k"], official_momentum(step))
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads


# ---------------------------------------------------------------- the comparison


def max_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def compare(name, got, want, atol, rtol=0.0):
    assert got.shape == want.shape, name
    bound = atol + rtol * want.detach().double().abs()
    ok = (got.detach().double() - want.detach().double()).abs() <= bound
    assert bool(ok.all()), f"{name}: max |diff| {max_diff(got, want):.3g} (atol {atol}, rtol {rtol})"


def compare_state(engine_module, official_module, prefix):
    for (name, a), (_, b) in zip(engine_module.named_parameters(), official_module.named_parameters()):
        compare(f"{prefix} param {name}", a, b, PARAM_ATOL)
    for (name, a), (_, b) in zip(engine_module.named_buffers(), official_module.named_buffers()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), f"{prefix} buffer {name}: {a} != {b}"
        else:
            compare(f"{prefix} buffer {name}", a, b, STAT_ATOL)


def perm(*idx):
    return torch.tensor(idx)


# Each case: the steps it runs, (step, lam_mb, lam_bb, perm_mb, perm_bb), the upsampling mode
# and lam_concat. lam_bb inside the lam_margin (<= 0.08 from 0 or 1): x_bb is plain mixup;
# outside it: x_bb is the Mix Block's mix with the detached mask. The Mix Block of make_engine
# gives each image ~0.1-0.2 of itself (mean 1 - s): lam_mb MASK_LOSS_IDLE_LAM is within the mask
# margin of it (the mask loss is 0), every other lam_mb outside (the mask loss is active).
MASK_LOSS_IDLE_LAM = 0.25
CASES = {
    "mb-mask-nearest": ([(0, 0.85, 0.6, perm(1, 2, 0, 4, 5, 3), perm(5, 3, 4, 1, 0, 2))], "nearest", False),
    "margin-low-lam-concat": ([(0, 0.3, 0.05, perm(3, 4, 5, 0, 1, 2), perm(2, 0, 1, 5, 3, 4))], "nearest", True),
    "margin-high-edge": ([(30, 0.25, 0.92, perm(1, 0, 3, 2, 5, 4), perm(4, 5, 0, 1, 2, 3))], "nearest", False),
    "margin-exact-lam-concat": ([(10, 0.85, 0.08, perm(2, 3, 4, 5, 0, 1), perm(1, 2, 3, 4, 5, 0))], "nearest", True),
    "mb-mask-lam-concat": ([(50, 0.2, 0.35, perm(5, 4, 3, 2, 1, 0), perm(3, 5, 1, 0, 2, 4))], "nearest", True),
    "two-steps": ([(40, 0.85, 0.6, perm(1, 2, 0, 4, 5, 3), perm(5, 3, 4, 1, 0, 2)),
                   (41, 0.3, 0.04, perm(2, 0, 1, 5, 3, 4), perm(3, 4, 5, 0, 1, 2))], "nearest", True),
    "bilinear": ([(0, 0.85, 0.7, perm(1, 2, 0, 4, 5, 3), perm(5, 3, 4, 1, 0, 2))], "bilinear", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_step_equals_the_official_step(case):
    steps, mode, lam_concat = CASES[case]
    mixer = make_engine(mode, lam_concat)
    side = official_side(mixer)
    engine_opt = sgd(list(mixer.model.parameters()) + list(engine_mb_params(mixer).values()))
    official_opt = sgd(list(side["q"].parameters()) + list(side["mb"].values()))
    x, y = batch()
    for step, lam_mb, lam_bb, perm_mb, perm_bb in steps:
        draws = {0: (lam_mb, perm_mb), 1: (lam_bb, perm_bb)}  # MIX_BLOCK_STREAM, BACKBONE_STREAM
        logs, grads = engine_step(mixer, engine_opt, x, y, step, draws)
        loss, terms, want_grads = official_step(side, official_opt, x, y, step, (lam_mb, lam_bb), perm_mb, perm_bb,
                                                mode, lam_concat)
        for key, value in terms.items():
            compare(f"step {step} {key}", logs[key], value, LOSS_ATOL)
        compare(f"step {step} loss", logs["loss"], loss, LOSS_ATOL)
        if lam_mb == MASK_LOSS_IDLE_LAM:
            assert terms["l_mask"].item() == 0.0 == logs["l_mask"].item()  # inside the mask margin
        else:
            assert terms["l_mask"].item() > 0.0
        assert set(grads) == set(want_grads)
        for name, g in want_grads.items():
            compare(f"step {step} grad {name}", grads[name], g, GRAD_ATOL, GRAD_RTOL)
        compare_state(mixer.model, side["q"], f"step {step} q")
        compare_state(mixer.momentum_encoder, side["k"], f"step {step} k")
        for name, p in engine_mb_params(mixer).items():
            compare(f"step {step} mix block {name}", p, side["mb"][name], PARAM_ATOL)
