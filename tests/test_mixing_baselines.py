"""mixing/baselines.py: mixup and cutmix as timm draws them (--mixup/--cutmix with --mixup-prob,
--mixup-switch-prob, --mixup-mode and --cutmix-minmax), their label mixing, and the --model-ema head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from automix_fast.mixing import build_mixer, mix_cross_entropy
from automix_fast.mixing.baselines import MixupCutmix, cutmix_box, minmax_boxes
from automix_fast.models import create_model
from mixkit import batch


def seeded_batch(n=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)
def test_mixup_cutmix_switch_and_prob_follow_timm():
    model = create_model("tinynet", num_classes=5)
    both = MixupCutmix(model, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3, seed=3)
    kinds = [both.choose(s) for s in range(2000)]
    mixed = [k for k in kinds if k is not None]
    assert abs(len(mixed) / len(kinds) - 0.6) < 0.04  # --mixup-prob: share of mixed batches
    assert abs(mixed.count("cutmix") / len(mixed) - 0.3) < 0.05  # --mixup-switch-prob: share of cutmix
    assert kinds == [both.choose(s) for s in range(2000)]  # host draws, a pure function of the step
    only_cutmix = MixupCutmix(model, mixup_alpha=0.0, cutmix_alpha=1.0, seed=3)
    assert {only_cutmix.choose(s) for s in range(50)} == {"cutmix"}
    always = MixupCutmix(model, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0, seed=3)
    assert {always.choose(s) for s in range(50)} == {"cutmix"}


def test_unmixed_batch_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    never = MixupCutmix(model, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, seed=0)
    x, y = seeded_batch()
    loss, _ = never.loss(x, y, 7, 10)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


def test_cutmix_step_of_the_combined_policy_pastes_a_box():
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = build_mixer("mixup", model, mixup=0.8, cutmix=1.0, switch_prob=0.5, seed=1)
    step = next(s for s in range(100) if mixer.choose(s) == "cutmix")
    seen = {}
    real = model.forward
    model.forward = lambda x, head="one": (seen.setdefault("x", x.clone()), real(x, head))[1]
    x, y = seeded_batch()
    mixer.loss(x, y, step, 100)
    changed = (seen["x"] != x).any(dim=1)  # (N, H, W): pixels taken from the partner
    assert changed.any() and not changed.all()  # a box, not a blend of every pixel


def _seen_input(mixer, model, x, y, step):
    """(the batch the model was given, the loss) for one step of `mixer`."""
    seen, real = {}, model.forward
    model.forward = lambda inp, head="one": (seen.setdefault("x", inp.clone()), real(inp, head))[1]
    try:
        loss, _ = mixer.loss(x, y, step, 100)
    finally:
        model.forward = real
    return seen["x"], loss


def _partner(mixer, n, step):
    """The partners the elem/pair modes draw."""
    return mixer.partners(n, step)[0]


@pytest.mark.parametrize("kw", [{"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.8},
                                {"mixup_alpha": 0.0, "cutmix_alpha": 1.0, "cutmix_minmax": (0.3, 0.7)}])
def test_elem_mode_mixes_each_image_as_timms_per_sample_loop(kw):
    """elem: sample i is mixed with its partner by its own draws; checked against a plain
    per-sample loop (timm's _mix_elem) on the draws, and the loss against per-sample mixCE."""
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = MixupCutmix(model, mode="elem", seed=4, **kw)
    x, y = seeded_batch(n=12, seed=1)
    x = x.contiguous(memory_format=torch.channels_last)
    step = 5
    seen, loss = _seen_input(mixer, model, x, y, step)
    p = _partner(mixer, 12, step)
    lam_mixup, boxes, lam = mixer.draws_per_sample(12, 32, 32, step)
    expected = x.clone()
    for i in range(12):
        y0, y1, x0, x1 = (int(v) for v in boxes[i])
        if y1 > y0 and x1 > x0:
            expected[i, :, y0:y1, x0:x1] = x[p[i], :, y0:y1, x0:x1]
            assert lam[i] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)
        else:
            expected[i] = lam_mixup[i] * x[i] + (1 - lam_mixup[i]) * x[p[i]]
            assert lam[i] == pytest.approx(lam_mixup[i])
    torch.testing.assert_close(seen, expected)
    assert seen.is_contiguous(memory_format=torch.channels_last)
    assert len(set(np.round(lam, 6))) > 3  # one lambda per image, not one per batch
    logits = model(seen)
    ref = torch.stack([lam[i] * F.cross_entropy(logits[i:i + 1], y[i:i + 1])
                       + (1 - lam[i]) * F.cross_entropy(logits[i:i + 1], y[p[i]:p[i] + 1]) for i in range(12)]).mean()
    torch.testing.assert_close(loss, ref.float())


def test_per_sample_lambda_is_rounded_once_for_pixels_and_labels():
    """Under bf16 the blend happens in bf16: each image's labels take the lambda its pixels got."""
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    real = model.forward
    model.forward = lambda inp, head="one": real(inp.float(), head)
    mixer = MixupCutmix(model, mixup_alpha=1.0, mode="elem", seed=6)
    x, y = seeded_batch(n=12, seed=3)
    x16 = x.to(torch.bfloat16)
    seen, loss = _seen_input(mixer, model, x16, y, 2)
    p = _partner(mixer, 12, 2)
    lam = torch.from_numpy(mixer.draws_per_sample(12, 32, 32, 2)[0]).to(torch.bfloat16)
    assert (lam.double().numpy() != mixer.draws_per_sample(12, 32, 32, 2)[0]).any()  # rounding happened
    torch.testing.assert_close(seen, torch.lerp(x16[p], x16, lam.view(12, 1, 1, 1)), rtol=0, atol=0)
    logits = real(seen.float())
    lam = lam.float()
    ref = (lam * F.cross_entropy(logits, y, reduction="none")
           + (1 - lam) * F.cross_entropy(logits, y[p], reduction="none")).mean()
    torch.testing.assert_close(loss, ref)


def test_pair_mode_partners_trade_with_one_draw():
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = MixupCutmix(model, mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair", seed=2)
    x, y = seeded_batch(n=16, seed=2)
    kinds = set()
    for step in range(6):
        seen, _ = _seen_input(mixer, model, x, y, step)
        p = _partner(mixer, 16, step)
        assert torch.equal(p[p], torch.arange(16)) and not torch.equal(p, torch.arange(16))
        for i in range(16):
            j = int(p[i])
            changed_i, changed_j = (seen[i] != x[i]).any(0), (seen[j] != x[j]).any(0)
            if (changed_i.float().mean() < 0.99) and changed_i.any():  # a box: the same box both ways
                kinds.add("cutmix")
                assert torch.equal(changed_i, changed_j)
                assert torch.equal(seen[i][:, changed_i], x[j][:, changed_i])
            elif changed_i.any():  # a blend with one lambda: the pair's sum is kept
                kinds.add("mixup")
                torch.testing.assert_close(seen[i] + seen[j], x[i] + x[j])
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.parametrize("n", [7, 9])
def test_pair_mode_odd_batch_leaves_the_odd_image_unmixed(n):
    """An odd batch (an epoch's short last one) in pair mode: the pairs trade both ways and the
    image left over is its own partner, so it reaches the model as it is."""
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = MixupCutmix(model, mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair", seed=2)
    x, y = seeded_batch(n=n, seed=3)
    for step in range(4):
        p = _partner(mixer, n, step)
        assert torch.equal(p[p], torch.arange(n))
        alone = (p == torch.arange(n)).nonzero().flatten()
        assert alone.numel() == 1
        seen, _ = _seen_input(mixer, model, x, y, step)
        assert torch.equal(seen[alone], x[alone])


def test_per_sample_probabilities_follow_timm():
    model = create_model("tinynet", num_classes=5)
    mixer = MixupCutmix(model, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3, mode="elem", seed=3)
    draws = [mixer.draws_per_sample(500, 32, 32, s) for s in range(4)]
    lam_mixup, boxes, lam = (np.concatenate(d) for d in zip(*draws))
    cut = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    blended = lam_mixup < 1
    assert abs((cut | blended).mean() - 0.6) < 0.04  # --mixup-prob per image
    assert abs(cut.sum() / (cut | blended).sum() - 0.3) < 0.05  # --mixup-switch-prob per image
    assert np.all(lam[~(cut | blended)] == 1.0)
    again = mixer.draws_per_sample(500, 32, 32, 0)
    assert all(np.array_equal(a, b) for a, b in zip(again, draws[0]))  # host draws, a pure function of the step


def test_cutmix_minmax_box_sizes_and_lambda():
    rng = np.random.default_rng(0)
    boxes = minmax_boxes((0.25, 0.75), 32, 40, rng, 2000)
    hs, ws = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert hs.min() == 8 and hs.max() == 23 and ws.min() == 10 and ws.max() == 29  # timm: [int(min S), int(max S))
    assert boxes[:, 0].min() == 0 and boxes[:, 1].max() == 32 and (boxes[:, :2] >= 0).all() and (boxes[:, 1] <= 32).all()
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = build_mixer("cutmix", model, cutmix=1.0, cutmix_minmax=(0.25, 0.75), seed=0)
    assert mixer.cutmix_alpha == 1.0 and "boxes 0.25-0.75" in mixer.label
    x, y = seeded_batch()
    sizes = set()
    for step in range(8):  # batch mode: one box for the whole batch, of a size in the range
        seen, _ = _seen_input(mixer, model, x, y, step)
        changed = (seen != x).any(1).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 8 <= h <= 23 and 8 <= w <= 23 and changed.sum() <= h * w
        sizes.add((h, w))
    assert len(sizes) > 2
    with pytest.raises(ValueError, match="cutmix_minmax"):
        MixupCutmix(model, cutmix_alpha=1.0, cutmix_minmax=(0.8, 0.2))


def test_ema_head_follows_optimizer_steps_and_lives_in_the_state_dict():
    torch.manual_seed(0)
    mixer = build_mixer("vanilla", create_model("tinynet", num_classes=3), model_ema_decay=0.5)
    assert list(mixer.eval_heads()) == ["one", "ema"]
    assert any(k.startswith("model_ema.") for k in mixer.state_dict())
    assert not any(p.requires_grad for p in mixer.model_ema.parameters())
    w = mixer.model.head_one.weight
    start = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    mixer.after_step(0, 10)  # timm's first update takes the model's weights (decay 0)
    torch.testing.assert_close(mixer.model_ema.head_one.weight, start + 1.0)
    with torch.no_grad():
        w.add_(1.0)
    mixer.after_step(1, 10)
    torch.testing.assert_close(mixer.model_ema.head_one.weight, start + 1.5)
    with pytest.raises(ValueError, match="momentum encoder"):
        build_mixer("automix", create_model("tinynet", num_classes=3, mix_head=True), model_ema_decay=0.9)


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
