"""`automix-fast export` and `automix-fast eval` through the real command.

Export: the chosen encoder and head as plain weights (.safetensors and a weights_only .pt) with
torchvision's ResNet key names, loaded into a freshly built model, give the same logits.
Eval: a folder holding only val/, or a flat ImageFolder, without train/; class names checked;
per-class accuracy and confusion matrices in the JSON.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from automix_fast.cli import main
from automix_fast.export import from_export_keys, load_export, read_weights
from automix_fast.models import create_model
from faultkit import cli, fail_writes, make_folder, random_checkpoint, read_only, train_args

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
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    return path, random_checkpoint(path, "resnet18_cifar", "automix", CLASSES, seed=0, epoch=7)


def test_export_k_and_q_load_into_a_fresh_model_with_the_same_logits(automix_checkpoint, tmp_path):
    path, mixer = automix_checkpoint
    run = cli(["export", "--checkpoint", str(path), "--head", "k", "--output", str(tmp_path / "k.safetensors")])
    assert run.returncode == 0, run.stderr
    weights = read_weights(tmp_path / "k.safetensors")
    assert set(weights) == torchvision_resnet18_keys()
    meta = json.loads((tmp_path / "k.safetensors.json").read_text())
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
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.bin")]) == 2
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
    meta = json.loads((tmp_path / "t.pt.json").read_text())
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


# ----------------------------------------------------------------------------- unwritable --output
def test_an_unwritable_output_is_one_line_before_the_work(trained, tmp_path):
    """A read-only folder (chmod; skipped where root ignores it), an output whose parent is a
    file, and an output that is a folder: exit 2 with one line, before any evaluation or export."""
    data, run_dir = trained
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.pt2").mkdir()
    cases = [(tmp_path / "file" / "e.json", tmp_path / "file" / "m.pt2", "file is not a folder"),
             (tmp_path, tmp_path / "d.pt2", "it is a folder")]
    if not os.access(ro, os.W_OK):
        cases.append((ro / "e.json", ro / "m.pt2", "ro is not writable"))
    try:
        for eval_output, export_output, reason in cases:
            for argv in (["eval", "--checkpoint", str(run_dir / "last.pt"), "--output", str(eval_output)],
                         ["export", "--checkpoint", str(run_dir / "last.pt"), "--output", str(export_output)]):
                run = cli(argv)
                assert run.returncode == 2, (argv, run.stderr)
                err = run.stderr.strip()
                assert err.count("\n") == 0 and err.startswith("error: cannot write ") and reason in err, err
                assert run.stdout == ""  # nothing was evaluated or exported
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pt2", "file", "ro"] and not list(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_eval_and_export_on_a_read_only_file_system(trained, tmp_path, monkeypatch, capsys):
    _, run_dir = trained
    read_only(monkeypatch, tmp_path)
    for argv in (["eval", "--checkpoint", str(run_dir / "last.pt"), "--output", str(tmp_path / "e.json")],
                 ["export", "--checkpoint", str(run_dir / "last.pt"), "--output", str(tmp_path / "sub" / "m.pt2")]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"{tmp_path} is not writable" in err
    assert not list(tmp_path.iterdir())


def test_eval_prints_its_results_before_a_write_that_fails(trained, tmp_path, monkeypatch, capsys):
    """The folder was writable when checked, the write fails after the work (read-only file
    system now): the table is on the screen, the error is one line, no temp file is left."""
    _, run_dir = trained
    fail_writes(monkeypatch, errno.EROFS)
    out_path = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(run_dir / "last.pt"), "--output", str(out_path)]) == 2
    out, err = capsys.readouterr()
    assert "21 images in" in out and any(line.split()[:1] == ["one"] and len(line.split()) == 3 for line in out.splitlines())
    assert err.count("\n") == 1 and f"error: cannot write eval results {out_path}: Read-only file system" in err
    assert not list(tmp_path.iterdir())

    assert main(["export", "--checkpoint", str(run_dir / "last.pt"), "--output", str(out_path.with_suffix(".safetensors"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cannot write export" in err and "Read-only file system" in err
    assert not list(tmp_path.iterdir())


def test_eval_creates_a_missing_output_folder(trained, tmp_path):
    _, run_dir = trained
    out_path = tmp_path / "new" / "deeper" / "e.json"
    run = cli(["eval", "--checkpoint", str(run_dir / "last.pt"), "--output", str(out_path)])
    assert run.returncode == 0, run.stderr
    assert json.loads(out_path.read_text())["count"] == 21
    assert run.stdout.strip().splitlines()[-1] == f"per-class accuracy and confusion matrices: {out_path}"


# ----------------------------------------------------------------------------- a run with --val-split
@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """A tinynet checkpoint trained (random weights) on a flat 3-class folder of 10 images a
    class with --val-split 0.2: its val split is 2 images a class, 6 in all."""
    from faultkit import random_checkpoint

    root = tmp_path_factory.mktemp("splitrun")
    data = make_folder(root / "src", train_per_class=10, val_per_class=0) / "train"
    flat = data.rename(root / "flat")
    ckpt = root / "run" / "last.pt"
    ckpt.parent.mkdir()
    random_checkpoint(ckpt, "tinynet", "vanilla", ["class0", "class1", "class2"],
                      data_dir=str(flat), val_split=0.2, img_size=32, loader="torch", workers=0)
    return flat, ckpt


def _eval_count(ckpt, tmp_path, *flags) -> int:
    out = tmp_path / f"e{len(list(tmp_path.iterdir()))}.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--output", str(out), *flags]) == 0
    return json.loads(out.read_text())["count"]


def test_eval_data_dir_spelled_another_way_keeps_the_val_split(split_run, tmp_path, monkeypatch):
    """--data-dir naming the training folder (with a trailing slash, relative, through .. or a
    symbolic link) evaluates the held-out part, never the training images."""
    flat, ckpt = split_run
    assert _eval_count(ckpt, tmp_path) == 6
    (tmp_path / "link").symlink_to(flat)
    monkeypatch.chdir(flat.parent)
    for spelling in (f"{flat}/", "flat", "./flat/", f"{flat}/../flat", str(tmp_path / "link")):
        assert _eval_count(ckpt, tmp_path, "--data-dir", spelling) == 6, spelling
    other = tmp_path / "copy"
    shutil.copytree(flat, other)
    assert _eval_count(ckpt, tmp_path, "--data-dir", str(other)) == 30  # another folder: all of it


def test_eval_of_a_run_stored_with_a_relative_data_dir_from_elsewhere(tmp_path, monkeypatch, capsys):
    """The config's data_dir is relative to where train ran. From another folder, eval finds the
    data through the checkpoint's data_root (the absolute path train stores) and keeps the split;
    a checkpoint without it says so in one line and asks for --data-dir."""
    from faultkit import random_checkpoint

    flat = (make_folder(tmp_path / "src", train_per_class=10, val_per_class=0) / "train").rename(tmp_path / "flat")
    (tmp_path / "run").mkdir()
    kw = dict(data_dir="flat", val_split=0.2, img_size=32, loader="torch", workers=0)
    random_checkpoint(tmp_path / "run" / "old.pt", "tinynet", "vanilla", ["class0", "class1", "class2"], **kw)
    random_checkpoint(tmp_path / "run" / "new.pt", "tinynet", "vanilla", ["class0", "class1", "class2"],
                      data_root=str(flat), **kw)
    monkeypatch.chdir(tmp_path / "run")
    assert main(["eval", "--checkpoint", "old.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: data directory not found: flat (relative to the folder train ran in), as stored by the "
                   "run of old.pt; pass --data-dir"), err
    out = tmp_path / "out"
    out.mkdir()
    assert _eval_count("new.pt", out) == 6
    assert _eval_count("new.pt", out, "--data-dir", str(flat)) == 6
    assert _eval_count("new.pt", out, "--data-dir", "../flat/") == 6
    flat.rename(tmp_path / "moved")
    assert main(["eval", "--checkpoint", "new.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"not found: flat (relative to the folder train ran in) or {flat}, as stored" in err


def test_a_training_checkpoint_stores_its_data_folder_absolute(trained):
    from automix_fast.engine.checkpoint import load_checkpoint

    data, run_dir = trained
    assert load_checkpoint(run_dir / "last.pt")["data_root"] == os.path.abspath(data)


# ----------------------------------------------------------------------------- files no decoder reads
@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not __import__("automix_fast.data.dali", fromlist=["x"]).dali_available(), reason="NVIDIA DALI is not installed"))])
def test_eval_scores_the_rest_and_says_how_many_were_left_out(tmp_path, loader, capsys):
    """A val image that passes the pre-check but that no decoder reads: eval names it once as
    left out of the evaluation (nothing stops), scores the others, and counts it in the result
    line and the JSON. A JPEG whose header DALI's parser rejects is read from a repaired copy,
    never by the pipeline (no pipeline recovery)."""
    from PIL import Image

    from faultkit import random_checkpoint
    from oddkit import ODD_EDITS, UNREADABLE_EDITS, write

    data = make_folder(tmp_path / "data", train_per_class=2, val_per_class=4)
    jpegs = []
    for c in ("class0", "class1"):
        Image.open(data / "val" / c / "000.png").save(data / "val" / c / "x.jpg", quality=90)
        jpegs.append(str(data / "val" / c / "x.jpg"))
    broken, odd = jpegs
    write(broken, UNREADABLE_EDITS["undefined_huffman"](open(broken, "rb").read()))
    write(odd, ODD_EDITS[next(iter(ODD_EDITS))](open(odd, "rb").read()))
    random_checkpoint(tmp_path / "last.pt", "tinynet", "vanilla", ["class0", "class1", "class2"], data_dir=str(data),
                      img_size=32, loader=loader, workers=1)
    assert main(["eval", "--checkpoint", str(tmp_path / "last.pt"), "--output", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert f"13 images in {data / 'val'} (1 left out: no decoder reads them)" in out
    assert err.count(broken) == 1 and "left out of the evaluation" in err and "run stops" not in err, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["count"], result["left_out"], result["left_out_files"]) == (13, 1, [broken])
    if loader == "dali":
        assert err.count(odd) == 1 and "header repaired" in err and "decoded with Pillow" not in err, err


def test_eval_takes_the_skip_bad_images_its_refusal_asks_for(trained, tmp_path, capsys):
    data, run_dir = trained
    shutil.copytree(data / "val", tmp_path / "v")
    bad = tmp_path / "v" / "class1" / "cut.png"
    bad.write_bytes((tmp_path / "v" / "class1" / "000.png").read_bytes()[:100])
    argv = ["eval", "--checkpoint", str(run_dir / "last.pt"), "--data-dir", str(tmp_path / "v"),
            "--output", str(tmp_path / "e.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "pass --skip-bad-images" in err, err
    assert main(argv + ["--skip-bad-images"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["count"] == 21


def test_a_wrn_checkpoint_of_the_earlier_layout_is_one_line(tmp_path, capsys):
    """WRN checkpoints from before the conv biases (and the official block) do not load: export,
    eval and --resume say so in one line, naming the checkpoint."""
    from automix_fast.engine.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "old.pt"
    mixer = random_checkpoint(path, "wrn28_8_cifar", "vanilla", CLASSES)
    convs = {n for n, m in mixer.named_modules() if isinstance(m, torch.nn.Conv2d)}
    state = load_checkpoint(path)
    state["mixer"] = {k: v for k, v in state["mixer"].items() if k.rsplit(".", 1)[0] not in convs or k.endswith("weight")}
    save_checkpoint(path, state)
    for argv in (["export", "--checkpoint", str(path), "--output", str(tmp_path / "w.safetensors")],
                 ["eval", "--checkpoint", str(path), "--data-dir", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and "does not match" in err[0], err
        assert "lacks model.stem.0.bias (and " in err[0] or "lacks stem.0.bias (and " in err[0], err


@pytest.mark.parametrize("filters, want", [({"train_interpolation": "bicubic", "interpolation": "bicubic"}, "bicubic"),
                                           (None, "bilinear")])
def test_eval_and_export_resize_with_the_runs_eval_filter(tmp_path, filters, want):
    """`automix-fast eval` resizes with the run's --interpolation, and export's metadata names it;
    the checkpoint of a run from before the field (no such key in its config) keeps bilinear."""
    from PIL import Image

    from automix_fast.commands.common import eval_data, load_trained
    from automix_fast.data.transforms import PIL_FILTERS
    from automix_fast.engine.checkpoint import load_checkpoint, save_checkpoint

    data = make_folder(tmp_path / "data", train_per_class=2, val_per_class=2)
    path = tmp_path / "best.pt"
    random_checkpoint(path, "tinynet", "vanilla", ["class0", "class1", "class2"], data_dir=str(data), img_size=40,
                      loader="torch", **(filters or {}))
    if filters is None:
        state = load_checkpoint(path)
        for key in ("train_interpolation", "interpolation"):
            del state["config"][key]
        save_checkpoint(path, state)
    loader, info, spec = eval_data(load_trained(str(path)))
    assert spec.interpolation == want
    x, y = next(iter(loader))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    first = Image.open(info.val_samples[0][0]).convert("RGB")  # 32 px, upscaled to 40 for eval
    expected = torch.from_numpy(np.array(first.resize((40, 40), PIL_FILTERS[want]))).permute(2, 0, 1).float()
    torch.testing.assert_close(x[0] * std[0] + mean[0], expected, atol=1e-3, rtol=0)
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.safetensors")]) == 0
    meta = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert (meta["image_size"], meta["eval_resize"], meta["interpolation"]) == (40, 40, want)
