"""config/__init__.py (build_config): how --mix follows --mixup/--cutmix/--cutmix-minmax, and
the combinations of options that are one-line errors."""
from __future__ import annotations

import pytest

from automix_fast.config import build_config
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.mixing.baselines import Vanilla
from automix_fast.models import create_model
from faultkit import cli, train_args


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
    ({"cutmix_minmax": [0.2, "x"]}, "list of finite numbers"),
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


def test_mix_and_mixup_flags_disagree_on_the_command_line(data, tmp_path):
    run = cli(train_args(data, tmp_path, "bad", "--mix", "automix", "--cutmix", "1.0", epochs=1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "does not combine with --mix automix" in run.stderr


def test_automix_departures_name_each_alternative_to_the_official_step():
    from automix_fast.engine.train_options import automix_departures

    assert automix_departures(build_config().mixing) == []  # the default run is the official step
    cfg = build_config(overrides={"k_full_forward": False, "mix_block_every": 3, "mix_block_init": "cosine",
                                  "q_batched": True})
    assert automix_departures(cfg.mixing) == [
        "--no-k-full-forward (k stops at the mix stage on the clean batch)",
        "--mix-block-every 3 (the Mix Block trains on one step in 3)",
        "--mix-block-init cosine",
        "--q-batched (q's two passes as one: BatchNorm statistics over both batches)",
    ]
    assert automix_departures(build_config(overrides={"mix": "mixup", "q_batched": True}).mixing) == []


@pytest.mark.parametrize("recipe,flags,mix,alpha,alphas", [
    ("cifar100_r18_vanilla", {"mixup": 0.2}, "mixup", None, (0.2, 0.0)),
    ("cifar100_r18_mixup", {"mixup": 0.8, "cutmix": 1.0}, "mixup", None, (0.8, 1.0)),
    ("cifar100_r18_automix", {"cutmix": 1.0}, "cutmix", None, (0.0, 1.0)),
    ("cifar100_r18_automix", {"mix": "mixup"}, "mixup", None, (1.0, 0.0)),  # not the recipe's alpha 2
    ("cifar100_r18_vanilla", {"mix": "cutmix"}, "cutmix", None, (0.0, 0.2)),
    ("cifar100_r18_automix", {"mix": "mixup", "mix_alpha": 0.4}, "mixup", 0.4, (0.4, 0.0)),
    ("cifar100_r18_mixup", {"mix": "mixup"}, "mixup", 1.0, (1.0, 0.0)),  # the file's own --mix keeps its alpha
    ("cifar100_r18_mixup", {}, "mixup", 1.0, (1.0, 0.0)),
])
def test_command_line_picks_the_mixing_policy_over_a_recipe(recipe, flags, mix, alpha, alphas):
    from automix_fast.config import CONFIG_DIR, load_yaml

    cfg = build_config(load_yaml(f"{CONFIG_DIR}/{recipe}.yaml"), flags)
    mixing = cfg.mixing
    assert (mixing.mix, mixing.mix_alpha) == (mix, alpha)
    mixer = build_mixer(mixing.mix, create_model("tinynet", num_classes=3), alpha=mixing.mix_alpha, mixup=mixing.mixup,
                        cutmix=mixing.cutmix, cutmix_minmax=mixing.cutmix_minmax)
    assert (mixer.mixup_alpha, mixer.cutmix_alpha) == alphas


def test_a_mistyped_shipped_config_name_names_the_closest():
    from automix_fast.config import find_config

    with pytest.raises(ConfigError, match=r"; did you mean cifar100_r18_automix\?") as e:
        find_config("cifar100_r18_automx")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        find_config("no_such_recipe_at_all")
    assert "did you mean" not in str(e.value) and "shipped configs: cifar100_r18_automix" in str(e.value)


def test_idle_flags_names_the_typed_flags_this_run_never_reads():
    from automix_fast.config import idle_flags

    typed = {"mix": "mixup", "lam_margin": 0.1, "mix_block_every": 2, "model_ema_decay": 0.99, "decay_rate": 0.5,
             "mixup_prob": 0.5, "lr": 0.1}
    line = idle_flags(build_config({}, typed), typed)
    assert line == ("warning: these flags change nothing in this run: --lam-margin, --mix-block-every (read only "
                    "with --mix automix); --model-ema-decay (read only with --model-ema); --decay-rate (read only "
                    "with --sched step/multistep)"), line
    # The same values where each one is read: no line; a value only in the -c file is not typed.
    read = {"lam_margin": 0.1, "mix_block_every": 2, "decay_rate": 0.5, "sched": "step", "decay_epochs": 1}
    assert idle_flags(build_config({}, read), read) is None
    cfg = build_config({"lam_margin": 0.1}, {"mix": "mixup"})
    assert idle_flags(cfg, {"mix": "mixup"}) is None
    typed = {"amp": False, "amp_dtype": "float16", "torchcompile_scope": "step", "mix": "vanilla", "mix_alpha": 1.0}
    line = idle_flags(build_config({}, typed), typed)
    assert "--amp-dtype (read only with --amp)" in line and "--torchcompile-scope (read only with --torchcompile)" in line
    assert "--mix-alpha (read only with a --mix that mixes)" in line
    # The border of the cifar aug's crop: idle with --aug imagenet, read with auto (cifar up to 64 px).
    typed = {"aug": "imagenet", "crop_padding_mode": "reflect"}
    assert idle_flags(build_config({}, typed), typed) == (
        "warning: these flags change nothing in this run: --crop-padding-mode (read only with --aug cifar)")
    assert idle_flags(build_config({}, {"crop_padding_mode": "reflect"}), {"crop_padding_mode": "reflect"}) is None


def test_every_idle_flag_rule_names_a_field():
    from automix_fast.config import FIELDS, _READ_ONLY_WITH

    assert set(_READ_ONLY_WITH) <= set(FIELDS), set(_READ_ONLY_WITH) - set(FIELDS)
