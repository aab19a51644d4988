"""Dataset layouts through the command: a config's pinned dataset named in the error, folders
without a validation split (--val-split), and the files --skip-bad-images drops before training
listed in the run folder."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from automix_fast.cli import main
from automix_fast.data import DataSpec, resolve_dataset
from test_data_cifar import make_cifar10

FAST = ["--model", "tinynet", "--kernel-backend", "torch", "--loader", "torch", "--workers", "0",
        "--log-interval", "5", "--epochs", "1"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, lines
    return lines[0]


def make_images(root, classes=("ant", "bee", "cat"), per_class=10, splits=("train",)):
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (80 * c, 20 * i, 90)).save(folder / f"{i:02d}.jpg")
    return root


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


# ----------------------------------------------------------------- a config's pinned dataset

def test_pinned_dataset_error_names_the_config_and_the_override(tmp_path, capsys):
    make_cifar10(tmp_path / "c10")
    common = ["--data-dir", str(tmp_path / "c10"), "-b", "5", "--output", str(tmp_path / "out"), *FAST]
    code, _, err = run(["train", "-c", "cifar100_r18_mixup", *common], capsys)
    line = one_error_line(err)
    assert code == 2 and "no cifar-100-python/" in line and "it holds CIFAR-10" in line
    assert "the config cifar100_r18_mixup sets dataset: cifar100" in line
    assert "--dataset cifar10 to train it on CIFAR-10" in line and "-c cifar10_r18_mixup" in line
    code, _, err = run(["train", "-c", "cifar100_r18_mixup", "--dataset", "cifar10", *common], capsys)
    assert code == 0, err  # the override the error names trains
    code, out, err = run(["train", "-c", "cifar10_r18_mixup", *common], capsys)
    assert code == 0, err  # and so does the shipped CIFAR-10 config it names
    assert "on cifar10 (15 train / 3 val, 10 classes" in out


def test_a_config_naming_num_classes_gets_that_flag_too(tmp_path, capsys):
    make_cifar10(tmp_path / "c10")
    (tmp_path / "mine.yaml").write_text("base: cifar100_r18_automix.yaml\nnum_classes: 100\n")
    code, _, err = run(["train", "-c", str(tmp_path / "mine.yaml"), "--data-dir", str(tmp_path / "c10"),
                        "--output", str(tmp_path / "out"), *FAST], capsys)
    line = one_error_line(err)
    assert code == 2 and "the config mine sets dataset: cifar100" in line
    assert "--dataset cifar10 --num-classes 10" in line


# ----------------------------------------------------------------- folders without a val split

@pytest.mark.parametrize("layout", ["train_only", "flat"])
def test_a_folder_without_val_needs_val_split_and_says_every_layout(layout, tmp_path, capsys):
    data = make_images(tmp_path / "data", splits=("train",))
    data_dir = data if layout == "train_only" else data / "train"
    code, _, err = run(["train", "--data-dir", str(data_dir), "--output", str(tmp_path / "out"), *FAST], capsys)
    line = one_error_line(err)
    assert code == 2 and "--val-split" in line
    for layout_text in ("DIR/train/<class>/ with DIR/val/<class>/", "DIR/test/<class>/", "cifar-10-batches-py/",
                        "cifar-100-python/", "a flat DIR/<class>/"):
        assert layout_text in line, layout_text


def test_pointing_at_train_of_a_full_root_names_the_root(tmp_path, capsys):
    data = make_images(tmp_path / "data", splits=("train", "val"))
    code, _, err = run(["train", "--data-dir", str(data / "train"), "--output", str(tmp_path / "out"), *FAST], capsys)
    line = one_error_line(err)
    assert code == 2 and f"--data-dir {data} (it holds train/ and val/)" in line
    code, _, err = run(["train", "--data-dir", str(data), "--val-split", "0.2", "--output", str(tmp_path / "out"),
                        *FAST], capsys)
    line = one_error_line(err)
    assert code == 2 and "has val/: drop --val-split" in line


def test_val_split_trains_records_and_resumes_on_the_same_images(tmp_path, capsys):
    data = make_images(tmp_path / "data", per_class=10)
    out = tmp_path / "out"
    args = ["train", "--data-dir", str(data), "--val-split", "0.2", "--train-subset", "0.5", "-b", "4",
            "--output", str(out), "--experiment", "v", "--seed", "7", *FAST]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    # 10 per class: 2 held out, 4 of the other 8 drawn by --train-subset.
    assert "on folder (12 train / 6 val, 3 classes" in stdout
    assert "val_split: 0.2" in (out / "v" / "config.yaml").read_text()
    assert records(out / "v", "eval")[-1]["values"]["count"] == 6
    code, stdout, err = run(["train", "--resume", "auto", "--experiment", "v", "--output", str(out),
                             "--epochs", "2"], capsys)
    assert code == 0, err
    assert "on folder (12 train / 6 val, 3 classes" in stdout
    code, _, err = run(["train", "--resume", "auto", "--experiment", "v", "--output", str(out), "--epochs", "3",
                        "--val-split", "0.3"], capsys)
    assert code == 2 and "val_split" in one_error_line(err)  # the split is part of the run
    code, stdout, err = run(["eval", "--checkpoint", str(out / "v" / "last.pt"), "--kernel-backend", "torch",
                             "--loader", "torch", "-j", "0"], capsys)
    assert code == 0, err
    assert "6 images in" in stdout  # eval reads the held-out part, not the whole folder


def test_the_split_is_fixed_balanced_disjoint_and_the_subset_comes_from_the_rest(tmp_path):
    data = make_images(tmp_path / "data", per_class=10)

    def split(data_dir, **kw):
        info = resolve_dataset(DataSpec(dataset="auto", data_dir=str(data_dir), val_split=0.3, **kw))
        rel = lambda samples: sorted(os.path.relpath(p, data_dir).replace("train" + os.sep, "") for p, _ in samples)
        return rel(info.train_samples), rel(info.val_samples), info

    train, val, info = split(data)
    assert len(val) == 9 and len(train) == 21 and not set(train) & set(val)
    assert np.bincount([y for _, y in info.val_samples]).tolist() == [3, 3, 3]
    assert split(data / "train", seed=5) [:2] == (train, val)  # a flat folder splits the same; --seed plays no part
    from automix_fast.data.subset import apply_train_subset

    for seed in (0, 1):
        apply_train_subset(info, 0.5, seed)
        assert {p for p, _ in info.train_samples} <= {os.path.join(data, "train", p) for p in train}


# ----------------------------------------------------------------- files skipped before training

def test_files_skipped_before_training_are_listed_in_the_run_folder(tmp_path, capsys):
    data = make_images(tmp_path / "data", per_class=4, splits=("train", "val"))
    bad = data / "train" / "bee" / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code, _, err = run(["train", "--data-dir", str(data), "--skip-bad-images", "-b", "4", "--output", str(out),
                        "--experiment", "s", *FAST], capsys)
    assert code == 0, err
    assert str(bad) in err  # named on the console as before
    listed = [line.split("\t") for line in (out / "s" / "bad_images.txt").read_text().splitlines()]
    assert listed == [[str(bad), "skipped before training", "not a JPEG, PNG, BMP or WEBP file"]]
    data_records = records(out / "s", "data")
    assert data_records and data_records[-1]["values"]["skipped_before_training"] == 1
    assert data_records[-1]["values"]["left_out"] == 0
    bad.unlink()  # fixed: the next check of a resumed run does not list it again
    code, _, err = run(["train", "--resume", "auto", "--experiment", "s", "--output", str(out), "--epochs", "2"],
                       capsys)
    assert code == 0, err
    assert (out / "s" / "bad_images.txt").read_text() == ""
