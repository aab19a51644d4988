"""`automix-fast visualize` through the real command: a labelled grid (classes, lambdas, a colour
bar), masks at several lambdas when the Mix Block sees lambda, the mask statistics printed, and
default file names that never replace an earlier picture."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from automix_fast.cli import main
from automix_fast.data.embedded import ensure_embedded_dataset
from automix_fast.visualize import colorize, next_free_path
from faultkit import fail_writes, read_only


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    data = ensure_embedded_dataset(str(root / "cache"), train_per_class=6, val_per_class=2)
    argv = ["train", "--data-dir", data, "--epochs", "1", "-b", "20", "--model", "tinynet", "--kernel-backend", "torch",
            "--loader", "torch", "-j", "0", "--lam-concat", "--output", str(root), "--experiment", "run",
            "--log-interval", "1"]
    assert main(argv) == 0
    return root / "run" / "last.pt"


def visualize(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "automix_fast", "visualize", *args, "--kernel-backend", "torch",
                           "--loader", "torch", "-j", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_visualize_labels_lambdas_stats_and_free_names(checkpoint):
    from PIL import Image

    run_dir = checkpoint.parent
    assert (run_dir / "mixes.png").exists()  # written by the training run
    out = visualize("--checkpoint", str(checkpoint), "--num", "4")
    first = run_dir / "mixes-1.png"
    assert out.strip().splitlines()[-1] == str(first)
    # One statistics line per lambda shown (the Mix Block sees lambda here), then the norms.
    stat_lines = [line for line in out.splitlines() if line.startswith("lam ")]
    assert [line.split(":")[0] for line in stat_lines] == ["lam 0.20", "lam 0.50", "lam 0.80"]
    assert all("partner weight" in line and "pixel std" in line and "saturated" in line for line in stat_lines)
    assert "target 0.800" in stat_lines[0]  # the target partner weight is 1 - lambda
    assert "Mix Block weight norms: W_q" in out
    with Image.open(first) as im:
        meta = dict(im.text)
        pixels = np.asarray(im.convert("RGB"))
    assert meta["lambdas"] == "0.2,0.5,0.8"
    assert meta["rows"].split(";") == ["image", "partner"] + [f"{kind} lam={lam}" for lam in ("0.20", "0.50", "0.80")
                                                               for kind in ("mask", "mix")]
    pairs = meta["pairs"].split(";")
    assert len(pairs) == 4 and all("+" in p for p in pairs)
    assert not any(p.split("+")[0].isdigit() for p in pairs)  # class names, not label numbers
    # The colour bar: both ends of the scale are in the picture.
    for end in (colorize(np.array(0.0)), colorize(np.array(1.0))):
        assert (pixels == end).all(-1).any()
    # A second call takes the next free name; an earlier picture is never replaced.
    before = first.read_bytes()
    out = visualize("--checkpoint", str(checkpoint), "--num", "2")
    assert out.strip().splitlines()[-1] == str(run_dir / "mixes-2.png")
    assert first.read_bytes() == before


def test_next_free_path(tmp_path):
    assert next_free_path(tmp_path) == tmp_path / "mixes.png"
    (tmp_path / "mixes.png").write_bytes(b"")
    (tmp_path / "mixes-1.png").write_bytes(b"")
    assert next_free_path(tmp_path) == tmp_path / "mixes-2.png"


def test_a_full_disk_while_writing_the_picture_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    fail_writes(monkeypatch, errno.ENOSPC)
    png = tmp_path / "m.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--num", "2", "--kernel-backend", "torch",
                 "--loader", "torch", "-j", "0", "--output", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write mask picture {png}" in err and "disk full" in err
    assert not png.exists() and not list(tmp_path.iterdir())  # no temp file left behind


def test_an_unwritable_output_is_one_line_before_the_work(checkpoint, tmp_path, monkeypatch, capsys):
    """A read-only folder and a path under a file: one line, exit 2, no picture drawn."""
    import automix_fast.commands.visualize

    def never(*args, **kwargs):
        raise AssertionError("the picture was drawn")

    monkeypatch.setattr(automix_fast.commands.visualize, "write_mix_grid", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    for png, reason in ((tmp_path / "ro" / "m.png", "ro is not writable"), (tmp_path / "file" / "m.png", "file is not a folder")):
        assert main(["visualize", "--checkpoint", str(checkpoint), "--num", "2", "--kernel-backend", "torch",
                     "--loader", "torch", "-j", "0", "--output", str(png)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"error: cannot write mask picture {png}: " in err and reason in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"] and not list((tmp_path / "ro").iterdir())


def test_an_output_that_is_not_png_is_one_line_before_the_work(checkpoint, tmp_path, capsys):
    for name in ("m.jpg", "m.PNG.txt", "m"):
        assert main(["visualize", "--checkpoint", str(checkpoint), "--output", str(tmp_path / name)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: --output must end in .png (the picture is a PNG), got {name}\n"
    assert not list(tmp_path.iterdir())


def test_the_help_names_the_default_pictures(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["visualize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mixes.png beside the checkpoint, or mixes-1.png, mixes-2.png ... once it exists" in text
