"""AutoMix step semantics (the step in automix_fast/mixing/automix.py) and the baselines' label mixing,
on the torch reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from automix_fast.mixing import build_mixer, mix_cross_entropy
from automix_fast.mixing.automix import encoder_momentum, mask_loss_weight
from automix_fast.mixing.baselines import cutmix_box
from automix_fast.mixing.mixblock import MixBlock
from automix_fast.models import create_model


def make_automix(**kw):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    return build_mixer("automix", model, seed=1, kernel_backend="torch", **kw)


def batch(n=6, size=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def fixed_lams(mixer, lam_mb, lam_bb):
    mixer.random.beta = lambda alpha, step, stream: lam_mb if stream == 0 else lam_bb


@pytest.mark.parametrize("lam_concat", [False, True])
def test_mixblock_matches_concat_formulation(lam_concat):
    """W f computed once + lam as bias == the 1x1 convs over concat(f, lam) (the Mix Block's definition)."""
    torch.manual_seed(0)
    mb = MixBlock(12, lam_concat=lam_concat, backend="torch")
    for p in mb.parameters():
        torch.nn.init.normal_(p, 0, 0.3)  # larger than the init so the attention is not flat
    f = torch.randn(3, 12, 4, 5)
    perm = torch.tensor([2, 0, 1])
    lam = 0.3
    a, b = f, f[perm]
    if lam_concat:
        a = torch.cat([a, torch.full_like(f[:, :1], lam)], 1)
        b = torch.cat([b, torch.full_like(f[:, :1], 1 - lam)], 1)
    q = mb.q_proj(a).flatten(2).transpose(1, 2)
    k = mb.q_proj(b).flatten(2).transpose(1, 2)
    v = mb.v_proj(b).flatten(2).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(mb.dim), -1)
    expected = (p @ v).transpose(1, 2).reshape(3, 1, 4, 5)
    got = mb(f, lam, perm)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mixblock_init_gives_half_masks():
    mb = MixBlock(64, backend="torch")
    f = torch.randn(4, 64, 8, 8)
    s = torch.sigmoid(mb(f, 0.5, torch.randperm(4)))
    assert (s - 0.5).abs().max() < 0.05


def test_loss_terms_route_gradients_as_designed():
    mixer = make_automix()
    fixed_lams(mixer, 0.9, 0.4)
    x, y = batch()
    mixer.train()
    parts = mixer.loss_terms(x, y, 5, 100)
    loss = parts["l_one_q"] + parts["l_mix_q"] + parts["l_mix_k"] + parts["l_mask"]
    mb = list(mixer.mix_block.parameters())
    q = list(mixer.model.parameters())

    def grads(term, params):
        return [g for g in torch.autograd.grad(term, params, allow_unused=True, retain_graph=True) if g is not None]

    for name in ("l_one_q", "l_mix_q"):
        assert all(g.abs().sum() == 0 for g in grads(parts[name], mb)), f"{name} reached the Mix Block"
    for name in ("l_mix_k", "l_mask"):
        gs = grads(parts[name], mb)
        assert gs and sum(g.abs().sum() for g in gs) > 0, f"{name} gave the Mix Block no gradient"
    # The k-branch loss and the mask loss do not train q.
    for name in ("l_mix_k", "l_mask"):
        assert all(g.abs().sum() == 0 for g in grads(parts[name], q)), f"{name} reached q"
    assert sum(g.abs().sum() for g in grads(parts["l_one_q"] + parts["l_mix_q"], q)) > 0
    loss.backward()
    assert all(p.grad is None for p in mixer.momentum_encoder.parameters())
    assert all(p.grad is not None for p in mixer.mix_block.parameters())


def test_mask_loss_value():
    mixer = make_automix(mask_loss_weight=0.1, mask_margin=0.1)
    fixed_lams(mixer, 0.9, 0.4)
    x, y = batch()
    _, logs = mixer.loss(x, y, 0, 100)
    self_weight = logs["mask_self_weight"].item()
    assert logs["l_mask"].item() == pytest.approx(0.1 * max(abs(self_weight - 0.9) - 0.1, 0), rel=1e-5)
    fixed_lams(mixer, 0.5, 0.4)
    _, logs = mixer.loss(x, y, 0, 100)
    assert logs["l_mask"].item() == 0.0  # inside the margin


def test_ema_averages_parameters_not_buffers():
    mixer = make_automix(momentum_base=0.9, momentum_end=0.99)
    q, k = mixer.model, mixer.momentum_encoder
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn_like(p))
        for b in q.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    k_before = [p.clone() for p in k.parameters()]
    kb_before = [b.clone() for b in k.buffers()]
    mixer.after_step(step=0, total_steps=100)  # m = base = 0.9
    for kp, k0, qp in zip(k.parameters(), k_before, q.parameters()):
        torch.testing.assert_close(kp, 0.9 * k0 + 0.1 * qp)
    for kb, b0 in zip(k.buffers(), kb_before):
        assert torch.equal(kb, b0)


def test_momentum_schedule_values():
    base, end, T = 0.999, 0.999999, 1000
    assert encoder_momentum(0, T, base, end) == base
    assert encoder_momentum(99, T, base, end) == base
    at_tenth = end - (end - base) * (math.cos(math.pi * 0.1) + 1) / 2
    assert encoder_momentum(100, T, base, end) == pytest.approx(at_tenth, abs=1e-12)
    assert encoder_momentum(500, T, base, end) == pytest.approx((base + end) / 2, abs=1e-12)
    assert encoder_momentum(T, T, base, end) == pytest.approx(end, abs=1e-12)
    assert mask_loss_weight(0, T, 0.1, True) == pytest.approx(0.1)
    assert mask_loss_weight(500, T, 0.1, True) == pytest.approx(0.05)
    assert mask_loss_weight(T, T, 0.1, True) == pytest.approx(0.0)
    assert mask_loss_weight(T, T, 0.1, False) == 0.1


def _capture_q_mix_input(mixer):
    seen = {}
    real = mixer.model.forward

    def forward(x, head="one"):
        if head == "mix":
            seen["x_bb"] = x.detach().clone()
        return real(x, head=head)

    mixer.model.forward = forward
    return seen


@pytest.mark.parametrize("lam_bb,plain", [(0.05, True), (0.95, True), (0.08, True), (0.3, False)])
def test_lambda_margin_fallback(lam_bb, plain):
    mixer = make_automix()
    fixed_lams(mixer, 0.5, lam_bb)
    seen = _capture_q_mix_input(mixer)
    x, y = batch()
    mixer.loss(x, y, step=7, total_steps=100)
    perm_bb = mixer.random.perm(x.shape[0], 7, 1, x.device)
    mixup = lam_bb * x + (1 - lam_bb) * x[perm_bb]
    if plain:
        torch.testing.assert_close(seen["x_bb"], mixup)
    else:
        assert not torch.allclose(seen["x_bb"], mixup, atol=1e-3)


def test_independent_lambdas_and_permutations():
    mixer = make_automix()
    r = mixer.random
    lams = [(r.beta(2.0, s, 0), r.beta(2.0, s, 1)) for s in range(20)]
    assert all(a != b for a, b in lams)
    perms = [(r.perm(16, s, 0, "cpu"), r.perm(16, s, 1, "cpu")) for s in range(20)]
    assert sum(torch.equal(a, b) for a, b in perms) == 0
    assert not torch.equal(r.perm(16, 0, 0, "cpu"), r.perm(16, 1, 0, "cpu"))
    assert r.beta(2.0, 3, 0) == r.beta(2.0, 3, 0)  # a pure function of (seed, step, stream)


def test_mixup_label_mixing():
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = build_mixer("mixup", model, alpha=1.0, seed=0)
    x, y = batch()
    loss, _ = mixer.loss(x, y, 4, 10)
    lam = mixer.random.beta(1.0, 4, 0)
    perm = mixer.random.perm(x.shape[0], 4, 0, "cpu")
    logits = model(lam * x + (1 - lam) * x[perm])
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix_cross_entropy(logits, y, perm, 1.0), F.cross_entropy(logits, y))


def test_cutmix_box_and_lambda_correction():
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = build_mixer("cutmix", model, alpha=1.0, seed=0)
    seen = {}
    real = model.forward
    model.forward = lambda x, head="one": (seen.setdefault("x", x.clone()), real(x, head))[1]
    x, y = batch()
    loss, _ = mixer.loss(x, y, 2, 10)
    lam0 = mixer.random.beta(1.0, 2, 0)
    perm = mixer.random.perm(x.shape[0], 2, 0, "cpu")
    y0, y1, x0, x1 = cutmix_box(lam0, 32, 32, mixer.random.uniform(2, 0, 2))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(seen["x"][..., inside], x[perm][..., inside])
    assert torch.equal(seen["x"][..., ~inside], x[..., ~inside])
    lam = 1 - inside.sum().item() / (32 * 32)
    logits = real(seen["x"])
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_cutmix_box_clipped_at_border():
    y0, y1, x0, x1 = cutmix_box(0.5, 32, 32, [0.0, 0.99])
    assert y0 == 0 and x1 == 32 and (y1 - y0) * (x1 - x0) < 0.5 * 32 * 32


def test_unknown_policy_and_missing_mix_head():
    from automix_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown mix policy 'puzzle'"):
        build_mixer("puzzle", create_model("tinynet", num_classes=3))
    with pytest.raises(ValueError, match="mix_head"):
        build_mixer("automix", create_model("tinynet", num_classes=3))
