"""bench/quality_study.py: every planned run's flags are a valid config; a tiny plan runs, writes
one JSON per run and the tables, skips finished runs, and resumes a checkpointed one. The
trainings are tinynet on 40 embedded images, 1-2 epochs (child processes, a few seconds each)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_study as qs  # noqa: E402

from automix_fast.cli import build_parser  # noqa: E402
from automix_fast.data.embedded import ensure_embedded_dataset  # noqa: E402


def test_every_planned_run_is_a_valid_config():
    from automix_fast.commands.train import train_config

    runs = qs.plan(sorted(qs.PLANS))
    ids = [r["id"] for r in runs]
    assert len(ids) == len(set(ids))
    assert {r["policy"] for r in runs} >= {"vanilla", "mixup", "cutmix0.2", "cutmix1", "automix", "mixup@eqtime"}
    for r in runs:
        args = build_parser().parse_args(["train", "--data-dir", "x", *r["argv"]])
        cfg, resumed = train_config(args)
        assert resumed is None
        assert cfg.run.seed == r["seed"] and cfg.schedule.epochs == r["epochs"]
    eq = next(r for r in runs if r["id"] == "sub10-mixup-eqtime-s0")
    assert eq["epochs"] == qs.EQUAL_TIME_FACTOR * qs.REGIMES["sub10"][1]
    long = next(r for r in runs if r["id"] == "sub10-automix-long-s1")
    assert long["policy"] == "automix@long" and long["epochs"] == eq["epochs"]
    assert long["argv"][long["argv"].index("--eval-interval") + 1] == eq["argv"][eq["argv"].index("--eval-interval") + 1]


@pytest.fixture()
def tiny_study(tmp_path, monkeypatch):
    data = ensure_embedded_dataset(str(tmp_path / "cache"), train_per_class=4, val_per_class=2)
    monkeypatch.setattr(qs, "RECIPE", ["--model", "tinynet", "-b", "10", "--loader", "torch", "-j", "0",
                                       "--kernel-backend", "torch", "--log-interval", "2"])
    monkeypatch.setattr(qs, "REGIMES", {"tiny": ([], 1, 1)})
    monkeypatch.setattr(qs, "PLANS", {"t": [("tiny", "vanilla", 0, 1), ("tiny", "automix", 0, 1)]})
    docs = tmp_path / "QUALITY.md"
    docs.write_text(f"# Q\n{qs.TABLE_BEGIN}\nold\n{qs.TABLE_END}\ntail\n")
    common = ["--plan", "t", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
              "--docs", str(docs), "--png-dir", str(tmp_path / "png"), "--threads", "1"]
    return data, common, tmp_path, docs


def test_tiny_study_runs_skips_and_resumes(tiny_study, monkeypatch, capsys):
    data, common, tmp, docs = tiny_study
    assert qs.main(["--data-dir", data, *common]) == 0
    res = {p.stem: json.loads(p.read_text()) for p in (tmp / "res").glob("*.json")}
    assert set(res) == {"tiny-vanilla-s0", "tiny-automix-s0"}
    auto = res["tiny-automix-s0"]
    assert set(auto["top1"]) == {"q_one", "q_mix", "k_one", "k_mix"} and auto["wall_s"] > 0
    assert auto["mask_stats"] and "mask_pixel_std" in auto["mask_stats"][-1]
    assert auto["per_epoch"][-1]["train_loss"] is not None
    assert (tmp / "png" / "tiny-automix-s0-masks.png").exists()
    text = docs.read_text()
    assert "old" not in text and "tiny-automix-s0" in text and text.endswith(f"{qs.TABLE_END}\ntail\n")
    assert "Vanilla's train/val gap" in text and "tiny-vanilla-s0 | 1: " in text
    assert "AutoMix's masks over training" in text and "| tiny-automix-s0 | 1: " in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| tiny | ")}
    assert rows["vanilla"].endswith(" | 1.00 |")  # wall time as a multiple of vanilla's
    ratio = float(rows["automix"].split(" | ")[-1].rstrip(" |"))
    assert ratio == pytest.approx(auto["wall_s"] / res["tiny-vanilla-s0"]["wall_s"], abs=0.006)

    # Finished runs are skipped: no training starts.
    started = []
    with monkeypatch.context() as m:
        m.setattr(qs.subprocess, "Popen", lambda *a, **k: started.append(a))
        assert qs.main(["--data-dir", data, *common]) == 0 and not started

    # A checkpointed, unrecorded run resumes: drop its JSON, ask for one more epoch.
    (tmp / "res" / "tiny-vanilla-s0.json").unlink()
    monkeypatch.setattr(qs, "REGIMES", {"tiny": ([], 2, 1)})
    monkeypatch.setattr(qs, "PLANS", {"t": [("tiny", "vanilla", 0, 1)]})
    capsys.readouterr()
    assert qs.main(["--data-dir", data, *common, "--list"]) == 0
    assert "checkpointed" in capsys.readouterr().out
    assert qs.main(["--data-dir", data, *common]) == 0
    rec = json.loads((tmp / "res" / "tiny-vanilla-s0.json").read_text())
    assert rec["epochs_run"] == 2 and [e["epoch"] for e in rec["per_epoch"]] == [1, 2]
    walls = json.loads((tmp / "runs" / "tiny-vanilla-s0" / "study_wall.json").read_text())
    assert len(walls) == 2 and rec["wall_s"] == pytest.approx(sum(walls))  # both attempts counted


def test_unknown_run_id_is_one_line(tiny_study, capsys):
    data, common, _, _ = tiny_study
    assert qs.main(["--data-dir", data, *common, "--only", "nope"]) == 2
    assert "not in the plan: nope" in capsys.readouterr().err


def test_stop_at_due_now_starts_nothing(tiny_study, monkeypatch):
    data, common, tmp, _ = tiny_study
    started = []
    monkeypatch.setattr(qs.subprocess, "Popen", lambda *a, **k: started.append(a))
    now = qs.dt.datetime.now(qs.dt.timezone.utc)
    if now.second >= 58:  # the minute must not turn between here and main's clock
        time.sleep(3)
        now = qs.dt.datetime.now(qs.dt.timezone.utc)
    assert qs.main(["--data-dir", data, *common, "--stop-at", now.strftime("%H:%M")]) == 130
    assert not started and not (tmp / "res").exists()


def test_stop_at_is_the_next_such_moment():
    utc = qs.dt.timezone.utc
    now = qs.dt.datetime(2026, 11, 29, 23, 10, 30, tzinfo=utc)
    assert qs.parse_stop_at("01:00", now) == qs.dt.datetime(2026, 11, 30, 1, 0, tzinfo=utc)  # past midnight
    assert qs.parse_stop_at("23:40", now) == qs.dt.datetime(2026, 11, 29, 23, 40, tzinfo=utc)
    assert qs.parse_stop_at("23:10", now) == qs.dt.datetime(2026, 11, 29, 23, 10, tzinfo=utc)  # this minute: due
    assert qs.parse_stop_at("23:09", now) == qs.dt.datetime(2026, 11, 30, 23, 9, tzinfo=utc)


@pytest.mark.parametrize("bad", ["25:00", "noon", "10:61", "1:2:3"])
def test_bad_stop_at_is_one_line(tiny_study, capsys, bad):
    data, common, _, _ = tiny_study
    assert qs.main(["--data-dir", data, *common, "--stop-at", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--stop-at {bad!r} is not a time of day" in err


def test_only_runs_in_the_order_given(tiny_study, monkeypatch):
    data, common, _, _ = tiny_study
    order = []
    monkeypatch.setattr(qs, "train", lambda run, args, stopper: order.append(run["id"]) or False)
    assert qs.main(["--data-dir", data, *common, "--only", "tiny-automix-s0", "tiny-vanilla-s0"]) == 0
    assert order == ["tiny-automix-s0", "tiny-vanilla-s0"]
