"""engine/initial_checkpoint.py: --initial-checkpoint loads weights only, from a run's checkpoint or
plain weights, and refuses another model or class count in one line."""
from __future__ import annotations

import pytest
import torch

from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.models import create_model
from faultkit import cli, make_folder, records, train_args


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


def test_initial_checkpoint_that_weights_only_refuses_names_the_reason(tmp_path, recwarn):
    """A file torch.load(weights_only=True) refuses: the one line says why (what it pickles, or
    that it is no torch.save file), not torch's advice to load it with weights_only=False, which
    the command line cannot do; torch's warnings stay out of the output."""
    import pickle

    import numpy as np

    from automix_fast.engine.initial_checkpoint import initial_weights
    from automix_fast.errors import CheckpointError

    model = create_model("tinynet", num_classes=3)
    torch.save({"model": model.state_dict(), "mean": np.zeros(3)}, tmp_path / "numpy.pt")
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch.save file at all\n")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": [1, 2]}, f)
    reasons = {"numpy.pt": "it pickles numpy.", "whole.pt": "it pickles automix_fast.models.classifier.Classifier",
               "junk.pt": "not a torch.save file", "plain.pkl": "not a torch.save file"}
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError) as info:
            initial_weights(str(tmp_path / name), "tinynet", 3)
        message = str(info.value)
        assert reason in message and "\n" not in message and "\x1b" not in message, message
        assert "weights_only` set to `False`" not in message and "trusted source" not in message, message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_initial_checkpoint_from_timm_style_files_and_wrapped_keys(data, tmp_path):
    """timm's checkpoints hold the weights under a key (its EMA first, as timm's load_checkpoint
    takes them) beside the epoch, the optimizer and the pickled argument Namespace; DDP prefixes
    the keys with `module.`, torch.compile with `_orig_mod.`. Unwrapped when the weights fit."""
    import argparse

    from automix_fast.engine.initial_checkpoint import load_initial_checkpoint

    torch.manual_seed(0)
    plain, ema = create_model("tinynet", num_classes=3), create_model("tinynet", num_classes=3)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    timm_file = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, "arch": "tinynet", "args": argparse.Namespace(model="tinynet", lr=0.1, amp=None),
                "optimizer": optimizer.state_dict(), "version": 2, "metric": 50.0,
                "state_dict": {"module." + k: v for k, v in plain.state_dict().items()},
                "state_dict_ema": {"module." + k: v for k, v in ema.state_dict().items()}}, timm_file)
    compiled = tmp_path / "compiled.pt"
    torch.save({"model": {"module._orig_mod." + k: v for k, v in plain.state_dict().items()}}, compiled)
    for path, source, expected in [
        (timm_file, "its 'state_dict_ema', 'module.' removed from its keys", ema),
        (compiled, "its 'model', 'module._orig_mod.' removed from its keys", plain),
    ]:
        mixer = build_mixer("vanilla", create_model("tinynet", num_classes=3))
        assert load_initial_checkpoint(mixer, str(path), "tinynet", 3) == source
        for k, v in expected.state_dict().items():
            assert torch.equal(mixer.model.state_dict()[k], v), (path, k)
    run = cli(train_args(data, tmp_path, "run", "--mix", "vanilla", "--initial-checkpoint", str(timm_file), epochs=1))
    assert run.returncode == 0, run.stderr
    assert f"model weights from {timm_file} (its 'state_dict_ema', 'module.' removed from its keys)" in run.stdout


def test_initial_checkpoint_that_is_no_state_dict_says_what_it_found(tmp_path):
    """Empty files, dicts without weights and weights of another model: one line saying what the
    file holds."""
    from automix_fast.engine.initial_checkpoint import initial_weights, load_initial_checkpoint
    from automix_fast.errors import CheckpointError

    model = create_model("tinynet", num_classes=3)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"epoch": 3, "arch": "tinynet"}, tmp_path / "meta.pt")
    torch.save({"state_dict": {"conv.weight": torch.zeros(1), "note": "x"}, "epoch": 1}, tmp_path / "mixed.pt")
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "hollow.pt")
    torch.save([model.state_dict()], tmp_path / "list.pt")
    torch.save({}, tmp_path / "nothing.pt")
    reasons = {"empty.pt": "the file is empty (0 bytes)", "meta.pt": "it holds a dict of 2 entries: 'epoch', 'arch'",
               "mixed.pt": "its 'state_dict' holds 'note', a str", "hollow.pt": "its 'state_dict' is empty",
               "list.pt": "it holds a list", "nothing.pt": "it holds an empty dict"}
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError) as info:
            initial_weights(str(tmp_path / name), "tinynet", 3)
        assert reason in str(info.value) and "\n" not in str(info.value), str(info.value)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 1},
               tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as info:
        load_initial_checkpoint(build_mixer("vanilla", create_model("resnet18_cifar", num_classes=3)),
                                str(tmp_path / "other.pt"), "resnet18_cifar", 3)
    message = str(info.value)
    assert "does not match resnet18_cifar: it lacks" in message, message
    assert f"(its 'state_dict', 'module.' removed from its keys: {len(model.state_dict())} tensors, the first " \
           f"'{next(iter(model.state_dict()))}')" in message, message
