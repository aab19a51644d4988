"""Where the engine follows the official AutoMix code (OpenMixup), point by point, and the mask
statistics every AutoMix step logs. Each test fails when the engine departs from the official
behaviour it pins."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from automix_fast.config import CONFIG_DIR, build_config, load_yaml
from automix_fast.data import DataSpec
from automix_fast.engine.optim import build_optimizer, param_groups_weight_decay
from automix_fast.engine.schedule import CompoundCosine, build_schedule
from automix_fast.mixing import build_mixer
from automix_fast.mixing.automix import derangement, encoder_momentum, mask_loss_weight, mask_statistics
from automix_fast.models import create_model
from automix_fast.ops import reference
from mixkit import batch, make_automix  # the same tiny AutoMix and batch as the step tests


def capture_mixes(mixer):
    """Record (perm, x_mix) of every Mix Block mix in the step (the first one is x_mb)."""
    seen, real = [], mixer.mix_block.mix

    def mix(logits, x, perm):
        out = real(logits, x, perm)
        seen.append((perm.clone(), out[0].detach().clone()))
        return out

    mixer.mix_block.mix = mix
    return seen


def last_bn(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]


# ---------------------------------------------------------------- 1. k's BN statistics


@pytest.mark.parametrize("full", [True, False])
def test_k_bn_statistics_after_the_mix_stage(full):
    """Official: k runs all stages on the clean batch, then on x_mb; its last BN's running
    mean after one step is the one of exactly those two train-mode passes."""
    mixer = make_automix(k_full_forward=full)
    mixer.train()
    reference_k = copy.deepcopy(mixer.momentum_encoder)
    seen = capture_mixes(mixer)
    x, y = batch()
    mixer.loss(x, y, 0, 100)
    x_mb = seen[0][1]
    with torch.no_grad():
        if full:
            reference_k.forward_features(x)  # all stages on the clean batch
        else:
            reference_k.forward_features(x, stages=mixer.mix_stage)
        reference_k(x_mb, head="mix")
    got, want = last_bn(mixer.momentum_encoder), last_bn(reference_k)
    torch.testing.assert_close(got.running_mean, want.running_mean)
    torch.testing.assert_close(got.running_var, want.running_var)
    assert got.num_batches_tracked.item() == (2 if full else 1)


# ---------------------------------------------------------------- 2. mask-loss anneal


def test_compound_mask_loss_anneal_matches_the_official_hook():
    """The hook multiplies the current weight by (1 + cos(pi t / T)) / 2 every iteration."""
    T, w0 = 100 * 5004, 0.1  # ImageNet, 100 epochs

    def official(t):  # the hook loop itself, as a recurrence
        w = w0
        for i in range(t + 1):
            w = w * (1 + math.cos(math.pi * i / T)) / 2
        return w

    anneal = CompoundCosine(w0, T)
    for frac in (0.01, 0.02, 0.03):
        t = int(frac * T)
        assert anneal(t) == pytest.approx(official(t), rel=1e-9)
        assert mask_loss_weight(t, T, w0, "compound") == pytest.approx(official(t), rel=1e-9)
    assert mask_loss_weight(int(0.01 * T), T, w0, "compound") < 0.07
    assert mask_loss_weight(int(0.03 * T), T, w0, "compound") < 1e-5 * w0 * 100  # effectively 0
    assert mask_loss_weight(int(0.03 * T), T, w0, "cosine") > 0.099  # our plain cosine barely moved
    assert anneal(50) == pytest.approx(official(50))  # going back (a resume) recomputes
    assert mask_loss_weight(10, T, w0, "none") == w0


def test_automix_uses_the_compound_weight():
    mixer = make_automix(mask_loss_anneal="compound", mask_loss_weight=0.1, mask_margin=0.0)
    mixer.random.beta = lambda alpha, step, stream: 0.9 if stream == 0 else 0.4
    x, y = batch()
    T, t = 1000, 40
    _, logs = mixer.loss(x, y, t, T)
    raw = abs(logs["mask_self_weight"].item() - 0.9)
    assert logs["l_mask"].item() == pytest.approx(mask_loss_weight(t, T, 0.1, "compound") * raw, rel=1e-5)


# ---------------------------------------------------------------- 3. weight decay on BN and biases


def test_decay_norm_and_bias_decays_every_parameter():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4))
    groups = param_groups_weight_decay(m, 1e-4, decay_all=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in m.parameters()}
    mixer = make_automix()
    groups = mixer.param_groups(0.1, 5e-4, decay_norm_and_bias=True, mix_block_momentum=0.0)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    opt = build_optimizer(groups, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["mix_block"]["momentum"] == 0.0 and by_name["model"]["momentum"] == 0.9


# ---------------------------------------------------------------- 4. momentum schedule start


@pytest.mark.parametrize("T", [15, 1005, 2345])
def test_momentum_cosine_starts_at_int_tenth(T):
    base, end = 0.999, 0.999999
    start = int(0.1 * T)
    assert start < 0.1 * T  # these T put the real 0.1 T between two steps
    assert encoder_momentum(start - 1, T, base, end) == base
    cosine = end - (end - base) * (math.cos(math.pi * start / T) + 1) / 2
    assert encoder_momentum(start, T, base, end) == pytest.approx(cosine, abs=1e-15)
    assert encoder_momentum(start, T, base, end) != base


# ---------------------------------------------------------------- 5. LR schedule granularity


def test_cosine_per_epoch_and_per_update():
    """mmcv's by-epoch cosine: annealing_cos(base, floor, epoch / epochs) for the whole epoch."""
    epochs, spe, base, floor = 4, 10, 0.1, 0.05
    kw = dict(total_steps=epochs * spe, steps_per_epoch=spe, floors=floor)
    per_epoch = build_schedule("cosine", base, on_updates=False, **kw)
    per_step = build_schedule("cosine", base, on_updates=True, **kw)
    for step in range(epochs * spe):
        e = step // spe
        mmcv = floor + (base - floor) * (1 + math.cos(math.pi * e / epochs)) / 2
        assert per_epoch.lr_at(step)[0] == pytest.approx(mmcv, abs=1e-15)
    assert per_step.lr_at(15)[0] < per_step.lr_at(10)[0] == per_epoch.lr_at(15)[0]
    assert build_config().schedule.sched_on_updates is False  # timm's default: per epoch


# ---------------------------------------------------------------- 6, 7. recipes


def recipe(name):
    return build_config(load_yaml(f"{CONFIG_DIR}/{name}.yaml"))


def test_tiny_imagenet_recipe_floors():
    cfg = recipe("tiny_r18_automix")
    assert (cfg.optim.lr, cfg.schedule.min_lr) == (0.2, 0.05)
    assert (cfg.optim.mix_block_lr, cfg.schedule.mix_block_min_lr) == (0.1, 1e-3)


def test_wrn28_8_recipe_and_mix_stage():
    cfg = recipe("cifar100_wrn28_8_automix")
    assert cfg.net.model == "wrn28_8_cifar"
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.min_lr) == (0.03, 1e-3, 1e-3)
    assert cfg.optim.mix_block_momentum == 0.0 and cfg.optim.mix_block_lr == 0.03 and cfg.schedule.epochs == 400
    for mix in ("vanilla", "mixup", "cutmix"):
        assert recipe(f"cifar100_wrn28_8_{mix}").net.model == "wrn28_8_cifar"
        for base in ("cifar100_r18", "cifar100_rx50", "cifar100_wrn28_8", "tiny_r18"):
            assert recipe(f"{base}_{mix}").schedule.min_lr == 0.0  # the official mixups baselines anneal to 0
    model = create_model("wrn28_8_cifar", num_classes=100, mix_head=True)
    assert model.mix_stage == 2 and model.stage_channels[model.mix_stage - 1] == 256
    assert make_automix_for(model).mix_block.in_channels == 256


def test_cifar10_recipes_are_the_cifar100_ones_on_cifar10():
    import dataclasses

    for model in ("r18", "rx50"):
        for mix in ("automix", "mixup", "cutmix", "vanilla"):
            ten, hundred = recipe(f"cifar10_{model}_{mix}"), recipe(f"cifar100_{model}_{mix}")
            assert (ten.data.dataset, hundred.data.dataset, ten.mixing.mix) == ("cifar10", "cifar100", mix)
            # CIFAR-100's own: the reflect-padded crop, ResNeXt-50 cutmix's weight decay 5e-4 (model zoo).
            data = dataclasses.replace(ten.data, dataset="cifar100", crop_padding_mode="reflect")
            optim = dataclasses.replace(ten.optim, weight_decay=hundred.optim.weight_decay)
            assert dataclasses.replace(ten, data=data, optim=optim) == hundred
            assert ten.optim.weight_decay == 1e-4
    mixup, cutmix = recipe("cifar10_r18_mixup"), recipe("cifar10_rx50_cutmix")
    # OpenMixup's CIFAR-10 baselines: SGD lr 0.1 momentum 0.9 wd 1e-4, cosine to 0, batch 100.
    assert (mixup.optim.lr, mixup.schedule.min_lr, mixup.optim.momentum, mixup.optim.weight_decay,
            mixup.data.batch_size) == (0.1, 0.0, 0.9, 1e-4, 100)
    assert (mixup.mixing.mix_alpha, cutmix.mixing.mix_alpha, mixup.schedule.epochs,
            cutmix.net.model) == (1.0, 0.2, 800, "resnext50_32x4d_cifar")
    automix = recipe("cifar10_r18_automix")
    assert (automix.mixing.mix_alpha, automix.schedule.min_lr) == (2.0, 0.05)
    assert automix.mixing.encoder_momentum_end == 0.999999


# OpenMixup's mixups baselines (docs/en/model_zoos/Mixup_sup.md and the configs under
# configs/classification/<dataset>/mixups/): (alpha, weight decay, lr, floor, epochs) per recipe.
OFFICIAL_BASELINES = {
    "cifar100_r18_mixup": (1.0, 1e-4, 0.1, 0.0, 800), "cifar100_r18_cutmix": (0.2, 1e-4, 0.1, 0.0, 800),
    "cifar100_r18_vanilla": (None, 1e-4, 0.1, 0.0, 800),
    "cifar100_rx50_mixup": (1.0, 1e-4, 0.1, 0.0, 800), "cifar100_rx50_cutmix": (0.2, 5e-4, 0.1, 0.0, 800),
    "cifar100_rx50_vanilla": (None, 1e-4, 0.1, 0.0, 800),
    "cifar100_wrn28_8_mixup": (1.0, 1e-3, 0.03, 0.0, 400), "cifar100_wrn28_8_cutmix": (0.2, 1e-3, 0.03, 0.0, 400),
    "cifar100_wrn28_8_vanilla": (None, 1e-3, 0.03, 0.0, 400),
    "tiny_r18_mixup": (1.0, 1e-4, 0.2, 0.0, 400), "tiny_r18_cutmix": (1.0, 1e-4, 0.2, 0.0, 400),
    "tiny_r18_vanilla": (None, 1e-4, 0.2, 0.0, 400),
    **{f"imagenet_{r}_{mix}": (alpha, 1e-4, 0.1, 0.0, 100)
       for r in ("r18", "r34", "r50")
       for mix, alpha in (("mixup", 0.2), ("cutmix", 0.2 if r == "r18" else 1.0), ("vanilla", None))},
}
# CIFAR-10's are CIFAR-100's, but ResNeXt-50 cutmix keeps its config's weight decay 1e-4.
OFFICIAL_BASELINES.update({name.replace("cifar100", "cifar10"): value for name, value in OFFICIAL_BASELINES.items()
                           if name.startswith(("cifar100_r18", "cifar100_rx50"))})
OFFICIAL_BASELINES["cifar10_rx50_cutmix"] = (0.2, 1e-4, 0.1, 0.0, 800)


def test_every_baseline_recipe_is_the_official_mixups_one():
    import os

    shipped = {f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")}
    assert {n for n in shipped if not n.endswith("_automix")} == set(OFFICIAL_BASELINES)
    for name, (alpha, wd, lr, floor, epochs) in OFFICIAL_BASELINES.items():
        cfg = recipe(name)
        assert cfg.mixing.mix == name.rsplit("_", 1)[1], name
        got = (cfg.optim.weight_decay, cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.epochs)
        assert got == (wd, lr, floor, epochs), name
        assert (cfg.optim.opt, cfg.optim.momentum, cfg.schedule.sched, cfg.schedule.warmup_epochs) == ("sgd", 0.9, "cosine", 0)
        if alpha is not None:
            assert cfg.mixing.mix_alpha == alpha, name
        automix = recipe(name.rsplit("_", 1)[0] + "_automix")
        assert (cfg.data.batch_size, cfg.data.img_size, cfg.net.model) == (
            automix.data.batch_size, automix.data.img_size, automix.net.model), name


def test_every_shipped_config_with_a_dataset_is_named_after_it():
    """A config that pins `dataset:` says so in its name (the error for other data names both)."""
    import os

    for name in sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")):
        pinned = recipe(name).data.dataset
        if pinned in ("cifar10", "cifar100"):
            assert name.startswith(pinned + "_"), name


def test_cifar_recipes_pad_the_training_crop_as_the_official_pipelines():
    """OpenMixup's dataset configs: CIFAR-100 RandomCrop(32, padding=4, padding_mode="reflect"),
    CIFAR-10 RandomCrop(32, padding=4) (zeros); both crop with the cifar aug at 32 px."""
    import os

    from automix_fast.data.torch_loader import resolve_aug

    for name in sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.startswith("cifar")):
        data = recipe(name).data
        want = "reflect" if name.startswith("cifar100_") else "zeros"
        assert data.crop_padding_mode == want, name
        assert resolve_aug(DataSpec(img_size=data.img_size, aug=data.aug)) == "cifar" and data.img_size == 32, name
    assert build_config().data.crop_padding_mode == "zeros"  # the default run: unchanged


def make_automix_for(model):
    return build_mixer("automix", model, seed=0, kernel_backend="torch")


def test_every_recipe_is_official_in_decay_and_schedule():
    import os

    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    assert len(names) >= 28
    for name in names:
        cfg = recipe(name)
        assert cfg.optim.decay_norm_and_bias and not cfg.schedule.sched_on_updates, name
        if cfg.mixing.mix == "automix":
            imagenet = name.startswith("imagenet")
            assert cfg.mixing.mask_loss_anneal == ("compound" if imagenet else "none"), name
            assert cfg.mixing.k_full_forward, name


def test_every_recipe_views_images_as_the_official_test_pipeline():
    """OpenMixup's dataset configs (configs/classification/_base_/datasets/): CIFAR-10/100 normalise
    with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.201) and test on the 32 px image;
    Tiny-ImageNet tests on the whole 64 px image (no resize, no centre crop); ImageNet resizes to
    256 and centre-crops 224, with ImageNet's mean and std."""
    import os

    from automix_fast.data import IMAGENET_MEAN, IMAGENET_STD, DataSpec, view_options
    from automix_fast.data.transforms import eval_resize_for

    cifar_mean, cifar_std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201)
    for name in sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")):
        data = recipe(name).data
        view = DataSpec(img_size=data.img_size, aug=data.aug, **view_options(data))
        resize = eval_resize_for(data.img_size, data.aug if data.aug != "auto" else "cifar", view.crop_pct)
        want = {"cifar": (cifar_mean, cifar_std, 32), "tiny_": (IMAGENET_MEAN, IMAGENET_STD, 64),
                "imagenet": (IMAGENET_MEAN, IMAGENET_STD, 256)}
        prefix = next(p for p in want if name.startswith(p))
        assert (view.mean, view.std, resize) == want[prefix], name


def test_every_recipe_resamples_with_the_official_filters():
    """OpenMixup's ImageNet pipeline (datasets/imagenet/basic_sz224_4xbs64.py, the base of its
    ResNet AutoMix and mixups configs) trains with RandomResizedCrop(224, interpolation=3) and
    tests with Resize(256, interpolation=3): PIL bicubic both; Tiny-ImageNet's
    (datasets/tiny_imagenet/sz64_bs100.py) trains with a bicubic RandomResizedCrop(64) and
    resizes nothing to test (bicubic would apply only to an image of another size); CIFAR's
    resizes nothing, and its recipes keep the default."""
    import os

    for name in sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")):
        data = recipe(name).data
        want = "bilinear" if name.startswith("cifar") else "bicubic"
        assert (data.train_interpolation, data.interpolation) == (want, want), name


# ---------------------------------------------------------------- 9. no-repeat shuffles


def test_no_repeat_permutations_and_the_official_fallback():
    mixer = make_automix()
    r = mixer.random
    for n in (2, 3, 5, 16):
        for step in range(30):
            perm = derangement(r, n, step, 0, "cpu", fallback=True)
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any(), (n, step, perm)
    # When ten draws all have a fixed point: the MB stream shifts, the backbone stream keeps the 11th.
    r.perm = lambda n, step, stream, device: torch.arange(n)
    shifted = derangement(r, 8, 0, 0, "cpu", fallback=True)
    shift = int(shifted[0])
    assert 1 <= shift <= 6 and torch.equal(shifted, (torch.arange(8) + shift) % 8)
    assert torch.equal(derangement(r, 8, 0, 1, "cpu", fallback=False), torch.arange(8))


def test_automix_no_repeat_never_mixes_an_image_with_itself():
    mixer = make_automix(mix_shuffle_no_repeat=True)
    mixer.random.beta = lambda alpha, step, stream: 0.5  # both branches use the Mix Block
    seen = capture_mixes(mixer)
    x, y = batch(n=3)
    for step in range(8):
        mixer.loss(x, y, step, 100)
    assert len(seen) == 16
    assert all(not (perm == torch.arange(3)).any() for perm, _ in seen[::2])  # x_mb: always
    plain = make_automix()
    found = []
    for step in range(20):
        found.append(bool((plain.random.perm(3, step, 0, "cpu") == torch.arange(3)).any()))
    assert any(found)  # without the switch, fixed points happen at this batch size


# ---------------------------------------------------------------- mask statistics


def full_resolution_stats(logits, size, lam):
    s = reference.upsample_mask(logits, size, "nearest")[:, 0]
    per_image = s.flatten(1)
    return {
        "mask_partner_mean": per_image.mean(),
        "mask_partner_target": torch.tensor(1 - lam),
        "mask_pixel_std": per_image.std(dim=1, unbiased=False).mean(),
        "mask_image_std": per_image.mean(1).std(unbiased=False),
        "mask_saturated": ((per_image < 0.05) | (per_image > 0.95)).float().mean(),
    }


def test_mask_statistics_read_collapsed_ratio_and_spatial_masks():
    n, h = 4, 4
    flat = torch.zeros(n, 1, h, h)  # collapsed: 0.5 everywhere
    ratio = torch.tensor([-3.0, -1.0, 1.0, 3.0]).view(n, 1, 1, 1).expand(n, 1, h, h).contiguous()
    spatial = torch.full((n, 1, h, h), -6.0)
    spatial[..., : h // 2] = 6.0  # half the image from the partner, saturated
    for logits, kind in ((flat, "flat"), (ratio, "ratio"), (spatial, "spatial")):
        _, s_mean = reference.mask_mix(logits, torch.zeros(n, 3, 8 * h, 8 * h), torch.arange(n).roll(1), mode="nearest")
        got = mask_statistics(logits, s_mean, lam=0.3)
        want = full_resolution_stats(logits, (8 * h, 8 * h), 0.3)
        for key, value in want.items():
            assert got[key].item() == pytest.approx(value.item(), abs=1e-5), (kind, key)
    assert mask_statistics(flat, torch.full((n,), 0.5), 0.5)["mask_pixel_std"].item() == 0.0
    ratio_stats = mask_statistics(ratio, torch.sigmoid(ratio[:, 0, 0, 0]), 0.5)
    assert ratio_stats["mask_pixel_std"].item() < 1e-6 < ratio_stats["mask_image_std"].item()
    spatial_stats = mask_statistics(spatial, torch.full((n,), 0.5), 0.5)
    assert spatial_stats["mask_pixel_std"].item() > 0.49 and spatial_stats["mask_saturated"].item() == 1.0


def test_step_logs_hold_the_mask_statistics_without_a_host_read():
    mixer = make_automix()
    x, y = batch()
    _, logs = mixer.loss(x, y, 0, 100)
    keys = ("mask_partner_mean", "mask_partner_target", "mask_pixel_std", "mask_image_std", "mask_saturated",
            "mix_block_q_norm", "mix_block_v_norm")
    for key in keys:
        assert isinstance(logs[key], torch.Tensor) and logs[key].ndim == 0, key
    assert logs["mask_partner_mean"].item() == pytest.approx(1 - logs["mask_self_weight"].item(), abs=1e-6)
    q_norm = torch.linalg.vector_norm(mixer.mix_block.q_proj.weight).item()
    assert logs["mix_block_q_norm"].item() == pytest.approx(q_norm)
    text = mixer.progress_text({k: float(v) for k, v in logs.items()})
    assert text.startswith("mask ") and "px-sd" in text and "sat" in text
    assert np.isfinite([float(logs[k]) for k in keys]).all()


def test_mask_loss_anneal_reads_the_old_boolean():
    from automix_fast.config import config_changes

    assert build_config({"mask_loss_anneal": True}).mixing.mask_loss_anneal == "cosine"
    assert build_config({"mask_loss_anneal": False}).mixing.mask_loss_anneal == "none"
    assert config_changes({"mask_loss_anneal": False}, build_config()) == []  # a checkpoint from before
    assert config_changes({"mask_loss_anneal": True}, build_config()) == ["mask_loss_anneal"]
