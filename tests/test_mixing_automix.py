"""mixing/automix.py: the AutoMix step on the torch reference (loss terms, mask loss, the
momentum encoder, lambdas and permutations, --mix-block-every)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from automix_fast.config import build_config
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.mixing.automix import encoder_momentum, mask_loss_weight
from automix_fast.models import create_model
from mixkit import batch, make_automix


def fixed_lams(mixer, lam_mb, lam_bb):
    mixer.random.beta = lambda alpha, step, stream: lam_mb if stream == 0 else lam_bb


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


def make_training_automix(**kw):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    mixer = build_mixer("automix", model, seed=1, kernel_backend="torch", **kw)
    mixer.train()
    return mixer


def test_every_one_is_todays_step():
    x, y = batch()
    default, every1 = make_training_automix(), make_training_automix(mix_block_every=1)
    for step in (0, 1, 2):
        a, la = default.loss(x, y, step, 10)
        b, lb = every1.loss(x, y, step, 10)
        torch.testing.assert_close(a, b)
        assert la.keys() == lb.keys()


def count_k_calls(mixer):
    calls = []
    mixer.momentum_encoder.register_forward_hook(lambda *_: calls.append(1))  # k(x_mb) only; features go through forward_features
    return calls


def test_every_two_skips_the_mix_block_branch_on_odd_steps():
    x, y = batch()
    mixer = make_training_automix(mix_block_every=2)
    calls = count_k_calls(mixer)
    keys = None
    for step, trains in ((0, True), (1, False), (2, True), (3, False)):
        mixer.zero_grad(set_to_none=True)
        before = len(calls)
        loss, logs = mixer.loss(x, y, step, 10)
        loss.backward()
        mb_grads = [p.grad for p in mixer.mix_block.parameters()]
        if trains:
            assert len(calls) == before + 1 and all(g is not None for g in mb_grads), step
            assert logs["l_mix_k"] > 0
        else:
            assert len(calls) == before, f"k ran on x_mb at skipped step {step}"
            assert all(g is None for g in mb_grads), f"the Mix Block got a gradient at skipped step {step}"
            assert logs["l_mix_k"] == 0 and logs["l_mask"] == 0
            assert all(p.grad is not None for p in mixer.model.parameters())  # q still trains
        keys = keys or logs.keys()
        assert logs.keys() == keys  # the training loop averages every key over every step
    with pytest.raises(ConfigError, match="--mix-block-every"):
        build_config(overrides={"mix_block_every": 0})


def _q_batch_norm_in_eval(mixer):
    """q's BatchNorm layers normalise with their running statistics (no batch statistics), so a
    pass's output for an image does not depend on the rest of its batch; k's are untouched."""
    for m in mixer.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def test_q_batched_is_the_two_passes_but_for_batch_statistics():
    """--q-batched: q's clean and mixed passes as one pass over both batches. Where batch
    statistics play no part (q's BatchNorm normalising with running statistics) it gives the
    two passes' losses, logs and gradients (to rounding); in training mode BatchNorm's
    statistics span both batches, so the losses and q's running statistics differ."""
    x, y = batch()
    two, one = make_training_automix(mix_block_every=2, lam_margin=0.3), \
        make_training_automix(mix_block_every=2, lam_margin=0.3, q_batched=True)
    assert (two.q_batched, one.q_batched) == (False, True)
    _q_batch_norm_in_eval(two), _q_batch_norm_in_eval(one)
    calls = []
    one.model.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    for step in range(4):  # both kinds of step (the Mix Block branch on even steps)
        for m in (two, one):
            m.zero_grad(set_to_none=True)
        loss_two, logs_two = two.forward_backward(x, y, step, 10, contextlib.nullcontext, lambda t: t.backward())
        loss_one, logs_one = one.forward_backward(x, y, step, 10, contextlib.nullcontext, lambda t: t.backward())
        torch.testing.assert_close(loss_one, loss_two, rtol=1e-5, atol=1e-6)
        assert logs_one.keys() == logs_two.keys()
        for k in logs_one:
            torch.testing.assert_close(logs_one[k], logs_two[k], rtol=1e-5, atol=1e-6, msg=k)
        for (name, p), q in zip(two.named_parameters(), one.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert calls == [2 * len(x)] * 4  # q ran once a step, on both batches

    # Training-mode BatchNorm: the batch statistics of the stacked batch, not of each pass.
    two, one = make_training_automix(), make_training_automix(q_batched=True)
    _, logs_two = two.loss(x, y, 0, 10)
    _, logs_one = one.loss(x, y, 0, 10)
    assert not torch.allclose(logs_one["l_one_q"], logs_two["l_one_q"])
    bn = "stem.1.running_mean"  # q's first BatchNorm
    assert not torch.allclose(one.model.state_dict()[bn], two.model.state_dict()[bn])


def test_q_batched_compiles_whole():
    """The batched q pass inside AutoMix's whole loss step: torch.compile(fullgraph=True) traces
    it (aot_eager) and it gives the eager batched step's losses."""
    torch._dynamo.reset()
    x, y = batch()
    eager, compiled = make_training_automix(q_batched=True), make_training_automix(q_batched=True)
    compiled.compile_step(backend="aot_eager")
    for step in (0, 1):
        loss_e, logs_e = eager.loss(x, y, step, 10)
        loss_c, logs_c = compiled.loss(x, y, step, 10)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logs_c["l_one_q"], logs_e["l_one_q"], rtol=1e-4, atol=1e-5)
