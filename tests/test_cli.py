"""The automix-fast command end to end on small embedded data: train, eval, visualize, models,
the Triton and torch backends step by step, and the DALI loader."""
from __future__ import annotations

import json
import os

import pytest
import torch

from automix_fast.cli import main
from automix_fast.data.embedded import ensure_embedded_dataset

FAST = ["--model", "tinynet", "--kernel-backend", "torch", "--loader", "torch", "--workers", "0", "--log-interval", "5"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A prefix of the embedded dataset: 60 train / 20 val images per class, 10 classes."""
    return ensure_embedded_dataset(str(tmp_path_factory.mktemp("cache")), train_per_class=60, val_per_class=20)


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def metrics(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


@pytest.mark.slow
def test_short_run_learns_the_embedded_data(tmp_path, capsys, monkeypatch):
    """The embedded default dataset (generated here, 5,000 train / 1,000 val) is learnable: six
    epochs of tinynet reach well above the 10% of chance."""
    monkeypatch.setenv("AUTOMIX_FAST_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["train", "--mix", "vanilla", "--epochs", "6", "--warmup-epochs", "1",
                          "--output", str(tmp_path), "--experiment", "learn", *FAST], capsys)
    assert code == 0, err
    assert "on embedded (5000 train / 1000 val, 10 classes, 32px)" in out
    ev = json.loads((tmp_path / "learn" / "summary.json").read_text())["eval"]
    assert ev["count"] == 1000
    assert ev["one_top1"] > 30.0, ev
    losses = [r["values"]["loss"] for r in metrics(tmp_path / "learn")]
    assert losses[-1] < 0.9 * losses[0]


def test_automix_run_eval_visualize_and_models(small_data, tmp_path, capsys):
    code, out, err = run(["train", "--data-dir", small_data, "--epochs", "2", "-b", "50", "--mix", "automix",
                          "--output", str(tmp_path), "--experiment", "e", *FAST], capsys)
    assert code == 0, err
    for head in ("q_one", "q_mix", "k_one", "k_mix"):  # the summary table names all four heads
        assert any(line.startswith(head) for line in out.splitlines())
    assert any(" mask " in line and "px-sd" in line for line in out.splitlines() if line.startswith("epoch"))
    assert "run folder:" in out and (tmp_path / "e" / "mixes.png").stat().st_size > 0
    assert (tmp_path / "e" / "best.pt").exists() and (tmp_path / "e" / "checkpoint-0002.pt").exists()
    ckpt = tmp_path / "e" / "last.pt"
    trained = json.loads((tmp_path / "e" / "summary.json").read_text())["eval"]
    code, out, err = run(["eval", "--checkpoint", str(ckpt), "--kernel-backend", "torch", "--loader", "torch", "-j", "0"], capsys)
    assert code == 0, err
    assert "200 images in" in out
    row = next(line for line in out.splitlines() if line.startswith("k_mix"))
    assert float(row.split()[1]) == pytest.approx(trained["k_mix_top1"], abs=1e-6)
    png = tmp_path / "grid.png"
    code, out, err = run(["visualize", "--checkpoint", str(ckpt), "--output", str(png), "--num", "4",
                          "--kernel-backend", "torch", "--loader", "torch", "-j", "0"], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(png) as im:
        # Without lam_concat the masks do not depend on lambda: rows image, partner, mask, mix once.
        assert im.text["rows"].split(";") == ["image", "partner", "mask lam=0.50", "mix lam=0.50"]
        assert len(im.text["pairs"].split(";")) == 4
    # The mask statistics: in every train line of metrics.jsonl, in the progress lines, in summary.json.
    for record in metrics(tmp_path / "e"):
        for key in ("mask_partner_mean", "mask_partner_target", "mask_pixel_std", "mask_image_std",
                    "mask_saturated", "mix_block_q_norm", "mix_block_v_norm"):
            assert key in record["values"], key
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert 0.0 <= summary["mask_stats"]["mask_partner_mean"] <= 1.0
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "resnet50_cifar" in out and "tinynet" in out


@pytest.mark.parametrize("mix", ["vanilla", "mixup", "cutmix"])
def test_baselines_train(mix, small_data, tmp_path, capsys):
    code, out, err = run(["train", "--data-dir", small_data, "--epochs", "1", "-b", "100", "--mix", mix,
                          "--output", str(tmp_path), "--experiment", mix, *FAST], capsys)
    assert code == 0, err
    ev = json.loads((tmp_path / mix / "summary.json").read_text())["eval"]
    assert set(k for k in ev if k.endswith("_top1")) == {"one_top1"}


def test_config_file_and_flag_override(small_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: cifar100_r18_automix.yaml\nepochs: 1\nbatch_size: 100\nlr: 0.3\n")
    code, _, err = run(["train", "-c", str(cfg), "--dataset", "folder", "--data-dir", small_data, "--lr", "0.2",
                        "--output", str(tmp_path), "--experiment", "c", *FAST], capsys)
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert saved["lr"] == 0.2 and saved["batch_size"] == 100 and saved["min_lr"] == 0.05
    assert saved["model"] == "tinynet" and saved["encoder_momentum_end"] == 0.999999


def _step_losses(backend, data, tmp_path, capsys):
    argv = ["train", "--data-dir", data, "--epochs", "1", "-b", "8", "--model", "tinynet", "--loader", "torch",
            "-j", "0", "--log-interval", "1", "--kernel-backend", backend, "--output", str(tmp_path),
            "--experiment", backend, "--no-visualize", "--mask-mode", "bilinear"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    return [r["values"] for r in metrics(tmp_path / backend)]


def test_triton_and_torch_backends_give_the_same_losses(tmp_path, capsys):
    """A whole AutoMix run with the Triton kernels (interpreter on CPU) against the reference."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest: the kernels run interpreted
    data = ensure_embedded_dataset(str(tmp_path / "cache"), train_per_class=4, val_per_class=2)
    ref = _step_losses("torch", data, tmp_path, capsys)
    tri = _step_losses("triton", data, tmp_path, capsys)
    assert len(ref) == len(tri) == 5
    for step, (a, b) in enumerate(zip(ref, tri)):
        for key in ("loss", "l_mix_k", "l_mask", "mask_self_weight"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (step, key, a[key], b[key])


def test_dali_loader_trains_an_epoch(small_data, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    code, out, err = run(["train", "--data-dir", small_data, "--epochs", "1", "-b", "50", "--model", "tinynet",
                          "--kernel-backend", "torch", "--loader", "dali", "-j", "2", "--output", str(tmp_path),
                          "--experiment", "dali", "--no-visualize"], capsys)
    assert code == 0, err
    assert "loader dali" in out
    ev = json.loads((tmp_path / "dali" / "summary.json").read_text())["eval"]
    assert ev["count"] == 200


def test_triton_backend_without_cuda_or_interpreter_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the Triton backend is available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, out, err = run(["train", "--kernel-backend", "triton", "--output", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "--kernel-backend" in err and "TRITON_INTERPRET=1" in err


def _tiny_folder(root, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    for split in ("train", "val"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 20 * j, 100)).save(root / split / c / f"{j}.jpg")
    return root


@pytest.mark.parametrize("damage", ["empty_class", "unreadable_image"])
def test_bad_data_is_a_one_line_error_naming_it(damage, tmp_path, capsys):
    data = _tiny_folder(tmp_path / "data")
    if damage == "empty_class":
        (data / "train" / "emu").mkdir()
        (data / "val" / "emu").mkdir()
        named = "emu"
    else:
        (data / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        named = "broken.jpg"
    code, _, err = run(["train", "--data-dir", str(data), "--output", str(tmp_path), *FAST], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert "Traceback" not in err


def test_abbreviated_flags_are_refused_through_the_command():
    from faultkit import cli

    run = cli(["train", "--epoch", "3", "--output", "/nonexistent"])
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "unrecognized arguments: --epoch 3" in lines[0]


def test_every_flag_has_help_and_shows_its_default():
    import argparse

    from automix_fast.cli import build_parser

    from automix_fast.config import FIELDS

    assert all(f.metadata["help"] for f in FIELDS.values())  # a real line for every config field
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "eval", "export", "visualize", "models"}
    for name, sub in commands.items():
        assert sub.allow_abbrev is False
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            assert len(text) > 10 and ("default" in text or "required" in text), (name, action.option_strings, text)
    text = " ".join(commands["train"].format_help().split())
    assert "--epochs EPOCHS epochs to train (may be raised when resuming) (default: 15)" in text
    assert "--mix {vanilla,mixup,cutmix,automix} mixing policy (default: automix)" in text


@pytest.mark.parametrize("typed,suggested,command", [
    (["--epoch", "3"], "--epochs", "train"),
    (["--lerning-rate", "0.1"], "--lr", "train"),
    (["--weight_decay", "0"], "--weight-decay", "train"),
    (["--no-visualise"], "--no-visualize", "train"),
    (["--xyzzy", "3"], None, "train"),
    (["--data", "/data/imagenet"], "--data-dir", "train"),  # not --dataset, which names the kind of data
    (["--data_path", "/data/imagenet"], "--data-dir", "train"),
    (["--checkpoint", "x.pt", "--bach-size", "3"], "--batch-size", "eval"),
])
def test_unknown_flag_points_to_the_subcommand_help_and_the_closest_flag(capsys, typed, suggested, command):
    with pytest.raises(SystemExit) as e:
        main([command, *typed])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    unknown = " ".join(t for t in typed if t not in ("--checkpoint", "x.pt"))
    assert err[0].startswith(f"error: unrecognized arguments: {unknown}")
    assert err[0].endswith(f"(see automix-fast {command} --help)")
    if suggested:
        assert f"; did you mean {suggested}?" in err[0]
    else:
        assert "did you mean" not in err[0]


@pytest.mark.parametrize("command", [["train"], ["eval", "--checkpoint", "x.pt"]])
def test_a_data_folder_given_alone_is_pointed_to_data_dir(capsys, tmp_path, command):
    """timm's train.py and NVIDIA's DALI scripts take the data folder as a positional DIR: the one
    line says which flag takes it (a word that is no folder gets no such hint)."""
    folder = tmp_path / "my data"
    folder.mkdir()
    with pytest.raises(SystemExit) as e:
        main([*command, str(folder), "--epochs", "1"] if command == ["train"] else [*command, str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"; the data folder is given with --data-dir '{folder}' (see automix-fast {command[0]} --help)" in err[0]
    with pytest.raises(SystemExit):
        main(["train", "imagenet"])
    assert "--data-dir" not in capsys.readouterr().err


def test_config_errors_name_the_flag_and_the_config_file_key(capsys, tmp_path):
    code, _, err = run(["train", "--model-ema", "--output", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: --model-ema is for the baselines") and "config field" not in err
    assert "got True" not in err
    code, _, err = run(["train", "--mix", "mixup", "--min-lr", "1", "--output", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == "error: --min-lr must be between 0 and --lr, got 1.0"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_ema: true\n")
    code, _, err = run(["train", "-c", str(recipe), "--output", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: --model-ema (model_ema in the config file) is for the baselines")
    recipe.write_text("mix_stage: 0\n")
    code, _, err = run(["train", "-c", str(recipe), "--mix", "vanilla", "--output", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == "error: --mix-stage (mix_stage in the config file) must be at least 1, got 0"
    code, _, err = run(["train", "-c", str(recipe), "--mix", "vanilla", "--mix-stage", "-1",
                        "--output", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == "error: --mix-stage must be at least 1, got -1"  # the flag overrides


def test_sched_help_says_the_cosine_moves_per_epoch(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at hyphens otherwise
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sched = text[text.index("--sched {cosine,step,multistep,const} "):]  # its help, not the usage block
    sched = sched[:sched.index("(default:")]
    assert "once per epoch" in sched and "--sched-on-updates" in sched and "per step" not in sched
    warmup = text[text.index("--warmup-epochs WARMUP_EPOCHS "):]
    assert "at most a quarter of --epochs" in warmup[:warmup.index("(default:")]


def _lrs(run_dir):
    return {r["epoch"]: r["values"]["lr"] for r in metrics(run_dir)}


def test_short_run_caps_the_default_warmup_and_keeps_a_given_one(tmp_path, capsys):
    from faultkit import make_folder

    data = make_folder(tmp_path / "data", train_per_class=6, val_per_class=2, classes=2)
    base = ["train", "--data-dir", str(data), "--img-size", "32", "--epochs", "2", "-b", "4", "--mix", "vanilla",
            "--device", "cpu", "--output", str(tmp_path), "--no-visualize", "--lr", "0.1", *FAST]
    code, out, err = run(base + ["--experiment", "capped"], capsys)
    assert code == 0, err
    assert "warm-up: 0.5 epochs (the default 1, capped at a quarter of the 2-epoch run" in out
    text = (tmp_path / "capped" / "config.yaml").read_text()
    assert "warmup_epochs: null  # ran as 0.5" in text
    assert _lrs(tmp_path / "capped")[2] < 0.1  # the last epoch decays from the peak (3 steps per epoch)
    code, out, err = run(base + ["--experiment", "given", "--warmup-epochs", "1"], capsys)
    assert code == 0, err
    assert "warm-up:" not in out
    assert "warning: --warmup-epochs 1 is more than a quarter of the 2-epoch run; kept as given" in err
    assert "warmup_epochs: 1.0\n" in (tmp_path / "given" / "config.yaml").read_text()
    assert _lrs(tmp_path / "given")[2] == pytest.approx(0.1)  # as asked: the cosine starts after epoch 1


def test_sched_step_and_multistep_take_timms_flags(tmp_path, capsys):
    """--sched step --decay-epochs N --decay-rate R (a period) and --sched multistep
    --decay-milestones A B (epochs), as timm's train.py; config.yaml records them."""
    from faultkit import make_folder

    data = make_folder(tmp_path / "data", train_per_class=6, val_per_class=2, classes=2)
    base = ["train", "--data-dir", str(data), "--img-size", "32", "--epochs", "4", "-b", "4", "--mix", "vanilla",
            "--device", "cpu", "--output", str(tmp_path), "--no-visualize", "--lr", "0.1", "--warmup-epochs", "0",
            "--eval-interval", "4", *FAST]
    code, out, err = run(base + ["--experiment", "step", "--sched", "step", "--decay-epochs", "2", "--decay-rate",
                                 "0.5", "--lam-margin", "0.1"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == ("warning: these flags change nothing in this run: --lam-margin (read only with "
                                   "--mix automix)"), err  # a typed flag --mix vanilla never reads
    assert _lrs(tmp_path / "step") == pytest.approx({1: 0.1, 2: 0.1, 3: 0.05, 4: 0.05})
    assert "sched: step\ndecay_epochs: 2.0\n" in (tmp_path / "step" / "config.yaml").read_text()
    code, out, err = run(base + ["--experiment", "multi", "--sched", "multistep", "--decay-milestones", "1", "3"],
                         capsys)
    assert code == 0, err
    assert "--lam-margin" not in err and "--decay" not in err
    assert _lrs(tmp_path / "multi") == pytest.approx({1: 0.1, 2: 0.01, 3: 0.01, 4: 0.001})  # epochs counted from 0
    assert "decay_milestones:\n- 1\n- 3\n" in (tmp_path / "multi" / "config.yaml").read_text()


def test_flags_without_a_command_are_trains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--epochs", "x"])  # fails in train's own parser, before any training
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--epochs" in err[0] and "'x'" in err[0], err
    with pytest.raises(SystemExit) as e:
        main(["-c", "cifar100_r18_automix", "--help"])
    assert e.value.code == 0 and "--mix-alpha" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "{train,eval,export,visualize,models}" in out and "--mix-alpha" not in out
