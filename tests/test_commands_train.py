"""`automix-fast train` end to end with timm's flags and the quality study's options: the EMA,
summary.csv and TensorBoard files of a run and its resume, --train-subset, --mix-block-init,
--mix-block-every and --eval-interval."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from automix_fast.cli import main
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.engine.tensorboard_log import tensorboard_available
from faultkit import cli, records, train_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mix_block_attention import main as attention_cli  # noqa: E402

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


def test_a_run_with_the_new_options(tiny_data, tmp_path, capsys):
    argv = ["train", "--data-dir", tiny_data, "--epochs", "1", "-b", "10", "--model", "tinynet", "--loader", "torch",
            "-j", "0", "--log-interval", "1", "--kernel-backend", "torch", "--output", str(tmp_path),
            "--experiment", "q", "--no-visualize", "--train-subset", "0.4", "--mix-block-init", "cosine-centered",
            "--mix-block-every", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    train = [r["values"] for r in rows if r["type"] == "train"]
    assert len(train) == 4  # 40 images of the 100, batch 10
    assert [v["l_mix_k"] == 0 for v in train] == [False, True, False, True]
    assert "mix_block_temperature" in train[-1]
    # The attention diagnostic reads the checkpoint back (bench/mix_block_attention.py).
    capsys.readouterr()
    out = tmp_path / "attn.json"
    assert attention_cli([str(tmp_path / "q" / "last.pt"), "--num", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert result["meta"]["torch"]
    assert row["mix_block_init"] == "cosine-centered" and row["images"] == 8
    assert row["q_cos"] < 0.5 and 0 < row["entropy"] <= 1 and row["logit_range"] > 0
    assert "cosine-centered" in capsys.readouterr().out


def test_eval_interval_evaluates_every_nth_epoch_and_the_last(tiny_data, tmp_path, capsys):
    argv = ["train", "--data-dir", tiny_data, "--epochs", "3", "-b", "20", "--model", "tinynet", "--loader", "torch",
            "-j", "0", "--kernel-backend", "torch", "--output", str(tmp_path), "--experiment", "e", "--no-visualize",
            "--mix", "vanilla", "--train-subset", "0.4", "--eval-interval", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["type"] == "eval"] == [2, 3]
    csv_rows = (tmp_path / "e" / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[3] != "" for r in csv_rows] == [False, True, True]  # eval_top1 per epoch
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["eval"]["one_top1"] == [r for r in rows if r["type"] == "eval"][-1]["values"]["one_top1"]
