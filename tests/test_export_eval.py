"""`automix-fast export` and `automix-fast eval` through the real command.

Export: the chosen encoder and head as plain weights (.safetensors and a weights_only .pt) with
torchvision's ResNet key names, loaded into a freshly built model, give the same logits.
Eval: a folder holding only val/, or a flat ImageFolder, without train/; class names checked;
per-class accuracy and confusion matrices in the JSON.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from automix_fast.cli import main
from automix_fast.config import build_config
from automix_fast.engine.checkpoint import save_checkpoint
from automix_fast.engine.policy import create_policy_model, wrap_policy
from automix_fast.engine.runner import FORMAT
from automix_fast.export import from_export_keys, load_export, read_weights
from automix_fast.models import create_model
from faultkit import cli, make_folder, train_args

CLASSES = ["cat", "dog", "emu"]


def torchvision_resnet18_keys() -> set[str]:
    """torchvision.models.resnet18().state_dict() keys, written out from its naming rules: conv1/bn1
    stem, layer1..4 of two BasicBlocks (conv1, bn1, conv2, bn2; downsample.0/.1 on the first block
    of layers 2-4), fc; every BatchNorm with its running statistics and num_batches_tracked."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            keys += [p + "conv1.weight", *(p + f"bn1.{b}" for b in bn), p + "conv2.weight", *(p + f"bn2.{b}" for b in bn)]
            if layer > 1 and block == 0:
                keys += [p + "downsample.0.weight", *(p + f"downsample.1.{b}" for b in bn)]
    keys += ["fc.weight", "fc.bias"]
    assert len(keys) == 122  # len(torchvision.models.resnet18().state_dict())
    return set(keys)


@pytest.fixture(scope="module")
def automix_checkpoint(tmp_path_factory):
    """An AutoMix resnet18_cifar checkpoint with random weights and BN statistics (q and k differ)."""
    cfg = build_config({"model": "resnet18_cifar", "mix": "automix", "device": "cpu", "kernel_backend": "torch"})
    torch.manual_seed(0)
    mixer = wrap_policy(cfg, create_policy_model(cfg, len(CLASSES)))
    with torch.no_grad():
        for name, t in mixer.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else 0.2 * torch.randn_like(t))
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"format": FORMAT, "config": cfg.to_dict(), "model_name": "resnet18_cifar",
                           "num_classes": len(CLASSES), "classes": CLASSES, "mixer": mixer.state_dict(), "epoch": 7})
    return path, mixer.eval()


def test_export_k_and_q_load_into_a_fresh_model_with_the_same_logits(automix_checkpoint, tmp_path):
    path, mixer = automix_checkpoint
    run = cli(["export", "--checkpoint", str(path), "--head", "k", "--output", str(tmp_path / "k.safetensors")])
    assert run.returncode == 0, run.stderr
    weights = read_weights(tmp_path / "k.safetensors")
    assert set(weights) == torchvision_resnet18_keys()
    meta = json.loads((tmp_path / "k.json").read_text())
    assert meta["classes"] == CLASSES and meta["image_size"] == 32 and meta["torchvision_model"] == "resnet18"
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert (meta["encoder"], meta["classifier"], meta["key_names"], meta["epoch"]) == ("k", "one", "torchvision", 7)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_export(tmp_path / "k.safetensors")(x), mixer.momentum_encoder(x, head="one"))

    run = cli(["export", "--checkpoint", str(path), "--head", "q", "--classifier", "mix", "--output", str(tmp_path / "q.pt")])
    assert run.returncode == 0, run.stderr
    plain = torch.load(tmp_path / "q.pt", weights_only=True)  # what a user without automix-fast does
    assert set(plain) == torchvision_resnet18_keys()
    fresh = create_model("resnet18_cifar", num_classes=3).eval()
    fresh.load_state_dict({from_export_keys(k, True): v for k, v in plain.items()})
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), mixer.model(x, head="mix"))
        assert not torch.allclose(fresh(x), mixer.momentum_encoder(x, head="mix"))  # q is not k


def test_export_mistakes_are_one_line(automix_checkpoint, tmp_path, capsys):
    path, _ = automix_checkpoint
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch vanilla tinynet run on a 3-class folder: (data, run folder)."""
    root = tmp_path_factory.mktemp("evalrun")
    data = make_folder(root / "data")
    run = cli(train_args(data, root, "run", "--mix", "vanilla", epochs=1))
    assert run.returncode == 0, run.stderr
    return data, root / "run"


def test_eval_on_a_folder_holding_only_val(trained, tmp_path):
    data, run_dir = trained
    shutil.copytree(data / "val", tmp_path / "valonly" / "val")
    run = cli(["eval", "--checkpoint", str(run_dir / "last.pt"), "--data-dir", str(tmp_path / "valonly"),
               "--output", str(tmp_path / "e.json")])
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    trained_eval = json.loads((run_dir / "summary.json").read_text())["eval"]
    one = result["heads"]["one"]
    assert result["count"] == trained_eval["count"] == 21
    assert one["top1"] == pytest.approx(trained_eval["one_top1"]) and one["top5"] == pytest.approx(trained_eval["one_top5"])
    conf = torch.tensor(one["confusion_matrix"])
    assert conf.shape == (3, 3) and conf.sum() == 21 and conf.sum(dim=1).tolist() == [7, 7, 7]
    assert list(one["per_class_top1"]) == ["class0", "class1", "class2"]
    assert one["per_class_top1"]["class1"] == pytest.approx(100.0 * conf[1, 1].item() / 7)


def test_eval_on_a_flat_image_folder_and_default_names_never_overwrite(trained, capsys, monkeypatch):
    import automix_fast.data

    def no_train_loader(spec):
        raise AssertionError("eval built the training loaders")

    monkeypatch.setattr(automix_fast.data, "build_loaders", no_train_loader)
    data, run_dir = trained
    for _ in range(2):
        assert main(["eval", "--checkpoint", str(run_dir / "last.pt"), "--data-dir", str(data / "val")]) == 0
    out = capsys.readouterr().out
    assert f"21 images in {data / 'val'}" in out
    first, second = json.loads((run_dir / "eval-last.json").read_text()), json.loads((run_dir / "eval-last-2.json").read_text())
    assert first["heads"] == second["heads"]


def test_eval_refuses_other_class_names(trained, tmp_path, capsys):
    data, run_dir = trained
    shutil.copytree(data / "val", tmp_path / "other")
    (tmp_path / "other" / "class2").rename(tmp_path / "other" / "zebra")
    assert main(["eval", "--checkpoint", str(run_dir / "last.pt"), "--data-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from the 3 classes" in err[0] and "zebra" in err[0] and "class2" in err[0]


def test_export_of_a_model_outside_the_resnet_family(trained, tmp_path, capsys):
    _, run_dir = trained
    assert main(["export", "--checkpoint", str(run_dir / "best.pt"), "--output", str(tmp_path / "t.pt")]) == 0
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta["key_names"] == "automix-fast" and meta["torchvision_model"] is None
    assert "fc.weight" in torch.load(tmp_path / "t.pt", weights_only=True)
    assert main(["export", "--checkpoint", str(run_dir / "best.pt"), "--head", "k"]) == 2  # vanilla: no momentum encoder
    assert "use --head q" in capsys.readouterr().err


def test_an_export_starts_a_new_run_as_initial_checkpoint(automix_checkpoint, tmp_path):
    """timm's --initial-checkpoint reads our own export (torchvision key names) back."""
    from automix_fast.engine.initial_checkpoint import load_initial_checkpoint
    from automix_fast.mixing import build_mixer

    path, mixer = automix_checkpoint
    run = cli(["export", "--checkpoint", str(path), "--head", "k", "--output", str(tmp_path / "k.pt")])
    assert run.returncode == 0, run.stderr
    torch.manual_seed(5)
    fresh = build_mixer("vanilla", create_model("resnet18_cifar", num_classes=len(CLASSES)))
    load_initial_checkpoint(fresh, str(tmp_path / "k.pt"), "resnet18_cifar", len(CLASSES))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval()(x), mixer.momentum_encoder(x, head="one"))
