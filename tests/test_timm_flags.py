"""timm's training flags: --mixup/--cutmix together with --mixup-prob,
--mixup-switch-prob, --mixup-mode and --cutmix-minmax, --model-ema (and its warm-up),
--clip-grad/--clip-mode, --drop-path, --grad-accum-steps, --initial-checkpoint, summary.csv
and --log-tensorboard.

Unit tests build tiny modules directly; the points about the command line run the real
`automix-fast train` in a subprocess (tinynet, 32 px, the generated 3-class folder).
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automix_fast.config import build_config
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.engine.grad_clip import grad_clipper
from automix_fast.engine.model_ema import ema_decay, ema_update
from automix_fast.engine.tensorboard_log import tensorboard_available
from automix_fast.engine.train import (EpochCallbacks, EpochPlan, StepContext, StepGuard, nonfinite_flag, optimizer_step,
                                       train_one_epoch)
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.mixing.baselines import MixupCutmix, Vanilla, minmax_boxes
from automix_fast.models import create_model
from automix_fast.models.drop_path import DropPath
from faultkit import cli, make_folder, records, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("timm") / "data")


def batch(n=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- mixup + cutmix
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
    x, y = batch()
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
    x, y = batch()
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
    x, y = batch(n=12, seed=1)
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
    x, y = batch(n=12, seed=3)
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
    x, y = batch(n=16, seed=2)
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
    x, y = batch()
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


@pytest.mark.parametrize("flags,mix,alphas", [
    ({"mixup": 0.8, "cutmix": 1.0}, "mixup", (0.8, 1.0)),
    ({"cutmix": 1.0}, "cutmix", (0.0, 1.0)),
    ({"mixup": 0.0, "cutmix": 0.0}, "vanilla", None),
    ({"mix": "cutmix", "mixup": 0.8, "cutmix": 1.0}, "cutmix", (0.8, 1.0)),
    ({"mix": "mixup", "mix_alpha": 0.4}, "mixup", (0.4, 0.0)),
    ({"cutmix_minmax": [0.2, 0.8]}, "cutmix", (0.0, 1.0)),  # timm: the box range turns cutmix on
    ({"mixup": 0.8, "cutmix_minmax": [0.2, 0.8]}, "mixup", (0.8, 1.0)),
    ({"mix": "cutmix", "mix_alpha": 0.5, "cutmix_minmax": [0.2, 0.8]}, "cutmix", (0.0, 0.5)),
])
def test_mix_follows_mixup_and_cutmix(flags, mix, alphas):
    cfg = build_config(overrides=flags)
    assert cfg.mixing.mix == mix
    mixing = cfg.mixing
    mixer = build_mixer(mixing.mix, create_model("tinynet", num_classes=3), alpha=mixing.mix_alpha, mixup=mixing.mixup,
                        cutmix=mixing.cutmix, cutmix_minmax=mixing.cutmix_minmax)
    if alphas is None:
        assert isinstance(mixer, Vanilla)
    else:
        assert (mixer.mixup_alpha, mixer.cutmix_alpha) == alphas


@pytest.mark.parametrize("flags,message", [
    ({"mix": "automix", "cutmix": 1.0}, "does not combine with --mix automix"),
    ({"mixup": 0.8, "mix_alpha": 1.0}, "drop --mix-alpha"),
    ({"mix": "cutmix", "mixup": 0.8}, "--mix cutmix disagrees"),
    ({"mix": "vanilla", "mixup": 0.8}, "--mix vanilla disagrees"),
    ({"mixup": -1.0}, r"must be 0 \(off\) or positive"),
    ({"mix": "mixup", "mixup_prob": 1.5}, "--mixup-prob"),
    ({"mix": "automix", "model_ema": True}, "--model-ema is for the baselines"),
    ({"mix": "vanilla", "grad_accum_steps": 0}, "--grad-accum-steps"),
    ({"mix": "vanilla", "drop_path": 1.0}, "--drop-path"),
    ({"mix": "vanilla", "clip_grad": 0.0}, "--clip-grad"),
    ({"mix": "automix", "cutmix_minmax": [0.2, 0.8]}, "does not combine with --mix automix"),
    ({"mix": "mixup", "cutmix_minmax": [0.2, 0.8]}, "--mix mixup does not cutmix"),
    ({"cutmix_minmax": [0.8, 0.2]}, "0 <= min < max <= 1"),
    ({"cutmix_minmax": [0.2]}, "0 <= min < max <= 1"),
    ({"cutmix_minmax": [0.2, "x"]}, "list of numbers"),
    ({"cutmix_minmax": [0.2, 0.8], "mix_alpha": 0.3}, "--mix-alpha goes with --mix"),
    ({"mix": "vanilla", "mixup_mode": "elem"}, "--mixup-mode is for --mix mixup/cutmix"),
    ({"mix": "automix", "mixup_mode": "pair"}, "--mixup-mode is for --mix mixup/cutmix"),
    ({"mixup": 1.0, "mixup_mode": "pair", "batch_size": 7}, "--batch-size must be even for --mixup-mode pair"),
    ({"mixup": 1.0, "mixup_mode": "rows"}, "--mixup-mode must be one of batch, pair, elem"),
    ({"mix": "mixup", "model_ema_warmup": True}, "--model-ema-warmup needs --model-ema"),
])
def test_nonsense_combinations_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=flags)


# ----------------------------------------------------------------------------- model EMA
def test_ema_update_is_timm_formula_and_copies_integer_buffers():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].num_batches_tracked.fill_(7)
    model[1].running_mean.normal_()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.9)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[k], 0.9 * before[k] + 0.1 * v)
        else:
            assert torch.equal(ema.state_dict()[k], v)


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


def test_ema_decay_is_timms_get_decay():
    """timm's ModelEmaV3.get_decay(step=num_updates), warmup_gamma 1, warmup_power 2/3."""
    assert ema_decay(0.9998, 1) == 0.0 and ema_decay(0.9998, 1, warmup=True) == 0.0
    assert ema_decay(0.9998, 2) == 0.9998
    for t in (1, 10, 1000):
        assert ema_decay(0.9998, t + 1, warmup=True) == pytest.approx(1 - (1 + t) ** (-2 / 3))
    assert ema_decay(0.9998, 10**9, warmup=True) == 0.9998  # capped at the decay
    mixer = build_mixer("mixup", create_model("tinynet", num_classes=3), mixup=1.0, model_ema_decay=0.99,
                        model_ema_warmup=True)
    assert "warm-up" in mixer.label
    w = mixer.model.head_one.weight
    mixer.after_step(0, 10)
    with torch.no_grad():
        w.add_(1.0)
    before = mixer.model_ema.head_one.weight.clone()
    mixer.after_step(1, 10)  # decay 1 - 2^(-2/3) = 0.37, not 0.99
    d = 1 - 2 ** (-2 / 3)
    torch.testing.assert_close(mixer.model_ema.head_one.weight, d * before + (1 - d) * w.detach())


# ----------------------------------------------------------------------------- gradient clipping
def _linear_with_grad(scale: float = 100.0):
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    (lin(torch.randn(4, 6)).pow(2).sum() * scale).backward()
    return lin, list(lin.parameters())


def test_clip_modes():
    lin, params = _linear_with_grad()
    grad_clipper(0.5, "norm")(params)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total == pytest.approx(0.5, rel=1e-4)
    lin, params = _linear_with_grad()
    grad_clipper(0.01, "value")(params)
    assert max(p.grad.abs().max().item() for p in params) == pytest.approx(0.01)
    lin, params = _linear_with_grad()
    grad_clipper(0.01, "agc")(params)
    w, g = lin.weight.detach(), lin.weight.grad
    assert torch.all(g.norm(dim=1) <= 0.01 * w.norm(dim=1) * (1 + 1e-4))
    assert grad_clipper(None) is None


def test_clipping_reads_nothing_on_the_host(monkeypatch):
    """A host read per step would stall a GPU pipeline; every mode stays on the device."""
    def refuse(*_a, **_k):
        raise AssertionError("clipping read a device value on the host")

    for mode in ("norm", "value", "agc"):
        _, params = _linear_with_grad()
        clip = grad_clipper(0.1, mode)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, refuse)
            clip(params)


def test_clip_applies_to_unscaled_gradients_under_grad_scaler():
    lin, params = _linear_with_grad(scale=0.0)
    opt = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    start = [p.detach().clone() for p in params]
    loss = lin(torch.randn(4, 6)).pow(2).sum() * 100.0
    opt.zero_grad()
    scaler.scale(loss).backward()
    optimizer_step(opt, params, StepGuard(torch.device("cpu")), scaler, nonfinite_flag(loss), grad_clipper(0.5, "norm"))
    moved = torch.linalg.vector_norm(torch.stack([(p.detach() - s).norm() for p, s in zip(params, start)]))
    assert moved == pytest.approx(0.5, rel=1e-4)  # clipped after unscaling: the scale does not leak in


# ----------------------------------------------------------------------------- drop path
def test_drop_path_linear_rule_eval_noop_and_same_state_dict():
    torch.manual_seed(0)
    plain = create_model("resnet18_cifar", num_classes=10)
    dropped = create_model("resnet18_cifar", num_classes=10, drop_path_rate=0.2)
    rates = [m.p for m in dropped.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(1, 8)])  # block 0 gets 0: no module
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))  # no effect in eval mode


def test_drop_path_drops_whole_samples_in_training():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    out = dp(torch.ones(400, 2, 3, 3))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # the whole sample
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.1


def test_drop_path_in_wrn_and_the_momentum_encoder():
    from automix_fast.models.wrn import wide_resnet

    wrn = wide_resnet(16, 1, 10, stem="cifar", drop_path_rate=0.3)  # 6 blocks
    assert [m.p for m in wrn.modules() if isinstance(m, DropPath)] == pytest.approx([0.3 * i / 5 for i in range(1, 6)])
    model = create_model("resnet18_cifar", num_classes=3, mix_head=True, drop_path_rate=0.1)
    mixer = build_mixer("automix", model, kernel_backend="torch")
    assert sum(isinstance(m, DropPath) for m in mixer.momentum_encoder.modules()) == 7


def test_drop_path_on_a_model_without_residual_blocks(data, tmp_path):
    run = cli(train_args(data, tmp_path, "dp", "--mix", "vanilla", "--drop-path", "0.1", epochs=1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "residual blocks" in run.stderr


# ----------------------------------------------------------------------------- gradient accumulation
class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _Schedule:
    def __init__(self):
        self.steps = []

    def apply(self, optimizer, step):
        self.steps.append(step)


def _accumulated_run(micro_batch: int, accum: int, images: int = 40, grad_sync=None, stop_after=None, resume=None):
    """Train a BN-free net (Vanilla) for one epoch; returns its weights and the steps scheduled.
    stop_after: stop after that many steps; resume: (model, optimizer, steps done) to continue."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(images, 3, 8, 8, generator=g), torch.randint(0, 4, (images,), generator=g)
    torch.manual_seed(0)
    # No BatchNorm: its batch statistics over b and 2b images differ, which would make the
    # comparison inexact for a reason that has nothing to do with accumulation.
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    skip = 0
    if resume is not None:
        model, opt, skip = resume
    mixer = Vanilla(model)
    loader = _Loader([(x[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, images, micro_batch)])
    schedule = _Schedule()
    calls = []
    stop = None if stop_after is None else (lambda: calls.append(1) or len(calls) >= stop_after)
    ctx = StepContext(mixer, opt, schedule, StepGuard(torch.device("cpu")), total_steps=100, amp_dtype=None,
                      accum_steps=accum, grad_sync=grad_sync)
    result = train_one_epoch(ctx, loader, EpochPlan(epoch=0, start_step=0, skip=skip),
                             EpochCallbacks(log_interval=2, should_stop=stop))
    if stop_after is not None:
        return model, opt, result
    return model.state_dict(), schedule.steps, result


def test_grad_accum_matches_the_larger_batch():
    big, big_steps, big_result = _accumulated_run(8, 1)
    acc, acc_steps, acc_result = _accumulated_run(4, 2)
    assert acc_steps == big_steps == list(range(5))  # steps count optimizer steps
    assert acc_result.images == big_result.images == 40
    for k in big:  # the same sums in another order: float32 rounding only
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_result.means["epoch_loss"], big_result.means["epoch_loss"], rtol=1e-5, atol=1e-6)


def test_grad_accum_under_torchrun_matches_one_process(data, tmp_path):
    """2 ranks x batch 4 x 2 micro-batches with SyncBN see, micro-batch for micro-batch, the images
    (and BN statistics) of 1 process x batch 8 x 2 micro-batches (see test_distributed); the
    gradients are all-reduced once per step, after the second micro-batch."""
    from faultkit import assert_states_equal, torchrun, train_losses, weights

    common = ["--mix", "vanilla", "--sync-bn", "--seed", "3", "--grad-accum-steps", "2"]
    one = cli(train_args(data, tmp_path, "one", *common, batch=8, epochs=1))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, train_args(data, tmp_path, "two", *common, batch=4, epochs=1))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    l1, l2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4  # 7 micro-batches: 3 steps of 2 and 1 of 1
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    # The summation order differs (per-rank means, then the all-reduce), as in test_distributed.
    assert_states_equal(weights(tmp_path / "two" / "last.pt"), weights(tmp_path / "one" / "last.pt"), atol=2e-4)


def test_grad_accum_resumes_mid_epoch_at_a_step_boundary():
    whole, _, _ = _accumulated_run(4, 3)
    model, opt, first = _accumulated_run(4, 3, stop_after=2)
    assert first.stopped and first.steps == 2
    rest, steps, _ = _accumulated_run(4, 3, resume=(model, opt, first.steps))  # replays 2 x 3 micro-batches
    assert steps == [2, 3]
    for k in whole:
        assert torch.equal(rest[k], whole[k]), k


def test_grad_accum_last_step_takes_the_rest():
    syncs = []
    _, steps, result = _accumulated_run(4, 3, grad_sync=syncs.append)  # 10 micro-batches: 3 + 3 + 3 + 1
    assert steps == [0, 1, 2, 3] and result.steps == 4 and result.images == 40
    assert len(syncs) == 4  # one all-reduce per optimizer step, none for the other micro-batches


# ----------------------------------------------------------------------------- the command line
FLAGS = ("--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--clip-grad", "1.0",
         "--grad-accum-steps", "2", "--mixup-mode", "elem", "--cutmix-minmax", "0.2", "0.8", "--model-ema-warmup")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_with_timm_flags_then_resume_keeps_ema_and_summary_rows(data, tmp_path):
    """Two epochs straight vs one epoch + a resume from checkpoint-0001.pt: the same EMA weights
    and the same summary.csv rows (the resumed run rewrites the earlier row from its history)."""
    tensorboard = tensorboard_available()  # the event files are checked when the package is installed
    straight = cli(train_args(data, tmp_path, "straight", *FLAGS, *(["--log-tensorboard"] if tensorboard else [])))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "straight"
    assert ("mixup 0.8 / cutmix boxes 0.2-0.8 of the side (cutmix share 0.5), drawn per image + model EMA 0.9 "
            "(warm-up)") in straight.stdout  # none dropped
    if tensorboard:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    state = load_checkpoint(run / "last.pt")
    assert state["config"]["mix"] == "mixup" and state["config"]["cutmix"] == 1.0
    assert state["config"]["mixup_mode"] == "elem" and state["config"]["cutmix_minmax"] == [0.2, 0.8]
    ema = {k: v for k, v in state["mixer"].items() if k.startswith("model_ema.")}
    assert ema and not all(torch.equal(v, state["mixer"]["model." + k[len("model_ema."):]]) for k, v in ema.items())
    evals = records(run, "eval")
    assert {"one_top1", "ema_top1", "ema_loss"} <= set(evals[-1]["values"])
    train = records(run)
    assert max(r["step"] for r in train if r["epoch"] == 1) == 4  # 7 batches of 8 -> 4 steps of up to 2
    rows = _rows(run / "summary.csv")
    assert list(rows[0])[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["eval_top1"]) == pytest.approx(evals[-1]["values"]["one_top1"])
    assert float(rows[1]["eval_ema_top1"]) == pytest.approx(evals[-1]["values"]["ema_top1"])

    resumed = cli(train_args(data, tmp_path, "resumed", *FLAGS, "--resume", str(run / "checkpoint-0001.pt")))
    assert resumed.returncode == 0, resumed.stderr
    again = load_checkpoint(tmp_path / "resumed" / "last.pt")["mixer"]
    for k, v in ema.items():
        assert torch.equal(again[k], v), k
    assert _rows(tmp_path / "resumed" / "summary.csv") == rows


def test_initial_checkpoint_loads_weights_only(data, tmp_path):
    """An AutoMix run started from a vanilla run's weights, at an lr too small to move them: its
    q and k end where the vanilla run ended (k restarts as a copy of q), at epoch 1 of its own."""
    first = cli(train_args(data, tmp_path, "first", "--mix", "vanilla", epochs=1))
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "first" / "last.pt"
    second = cli(train_args(data, tmp_path, "second", "--mix", "automix", "--initial-checkpoint", str(ckpt),
                            "--lr", "1e-7", "--warmup-epochs", "0", "--weight-decay", "0", epochs=1))
    assert second.returncode == 0, second.stderr
    saved = load_checkpoint(ckpt)["mixer"]
    state = load_checkpoint(tmp_path / "second" / "last.pt")
    weights = [k[len("model."):] for k in saved if k.startswith("model.") and "running_" not in k and "num_batches" not in k]
    assert weights
    for encoder in ("model.", "momentum_encoder."):
        for k in weights:
            torch.testing.assert_close(state["mixer"][encoder + k], saved["model." + k], atol=1e-4, rtol=0)
    assert [r["epoch"] for r in records(tmp_path / "second", "eval")] == [1]
    assert min(r["step"] for r in records(tmp_path / "second")) == 1  # a fresh step counter


def test_initial_checkpoint_class_mismatch_is_one_line(tmp_path):
    from automix_fast.engine.checkpoint import FORMAT, save_checkpoint

    model = create_model("tinynet", num_classes=3)  # what a 3-class run's checkpoint holds
    save_checkpoint(tmp_path / "three.pt", {"format": FORMAT, "model_name": "tinynet", "num_classes": 3,
                                            "mixer": {"model." + k: v for k, v in model.state_dict().items()}})
    four = make_folder(tmp_path / "four", train_per_class=4, val_per_class=2, classes=4)
    run = cli(train_args(four, tmp_path, "run", "--mix", "vanilla", "--initial-checkpoint",
                         str(tmp_path / "three.pt"), epochs=1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "trained for 3 classes, but the data has 4" in run.stderr


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_initial_checkpoint_from_plain_weights(tmp_path, suffix):
    from automix_fast.engine.initial_checkpoint import load_initial_checkpoint
    from automix_fast.errors import CheckpointError

    torch.manual_seed(0)
    source = create_model("tinynet", num_classes=3)
    path = tmp_path / ("w" + suffix)
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    torch.manual_seed(1)
    mixer = build_mixer("vanilla", create_model("tinynet", num_classes=3), model_ema_decay=0.9)
    load_initial_checkpoint(mixer, str(path), "tinynet", 3)
    for k, v in source.state_dict().items():
        assert torch.equal(mixer.model.state_dict()[k], v) and torch.equal(mixer.model_ema.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="trained for 3 classes, but the data has 4"):
        load_initial_checkpoint(build_mixer("vanilla", create_model("tinynet", num_classes=4)), str(path), "tinynet", 4)
    with pytest.raises(CheckpointError, match="does not match resnet18_cifar"):
        load_initial_checkpoint(build_mixer("vanilla", create_model("resnet18_cifar", num_classes=3)), str(path),
                                "resnet18_cifar", 3)


def test_mix_and_mixup_flags_disagree_on_the_command_line(data, tmp_path):
    run = cli(train_args(data, tmp_path, "bad", "--mix", "automix", "--cutmix", "1.0", epochs=1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "does not combine with --mix automix" in run.stderr


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_missing_is_one_line(monkeypatch, tmp_path):
    from automix_fast.engine import tensorboard_log
    from automix_fast.engine.metrics import MetricLogger

    monkeypatch.setattr(tensorboard_log, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        MetricLogger(tmp_path, tensorboard=True)


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from automix_fast.engine.metrics import MetricLogger

    logger = MetricLogger(tmp_path, tensorboard=True)
    for step, loss in enumerate(np.linspace(2.0, 1.0, 3)):
        logger.log("train", {"loss": loss, "skipped_steps": 0}, epoch=1, step=step)
    logger.log("eval", {"one_top1": 50.0, "count": 21}, epoch=1, step=3)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([2.0, 1.5, 1.0])
    assert [e.step for e in acc.Scalars("eval/one_top1")] == [3]
