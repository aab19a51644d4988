"""bench/bench_train_step.py's compiled configurations, on the CPU with the aot_eager backend
(no C++ compiler needed): `compiled` compiles the encoders, `compiled-step` AutoMix's whole loss
step (one graph per kind of step) and a baseline's model, as `automix-fast train --torchcompile
--torchcompile-scope encoders|step` does; each row says which, and how many graphs it compiled
in the warm-up and in the timed epochs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_train_step  # noqa: E402
from faultkit import one_thread  # noqa: E402,F401


@pytest.mark.slow
def test_compiled_and_compiled_step_rows_side_by_side(tmp_path, one_thread):
    out = tmp_path / "train.json"
    code = bench_train_step.main([
        "--model", "tinynet", "--img-size", "16", "-b", "4", "--num-classes", "10", "--steps", "2", "--repeats", "1",
        "--device", "cpu", "--compile-backend", "aot_eager", "--output", str(out),
        "--runs", "compiled:automix", "compiled-step:automix", "compiled-step:vanilla", "graphed-compiled-step:automix",
        "graphed-compiled:mixup"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["setup"]["compile_backend"] == "aot_eager"
    rows = {(r["config"], r["mix"]): r for r in data["results"]}
    assert all("error" not in r and r["img_per_s"] > 0 for r in rows.values()), rows
    assert rows["compiled", "automix"]["compile"] == "encoders" and rows["compiled", "automix"]["graphs"][0] >= 2
    # Every step of steps 0-3 trains the Mix Block: one graph, compiled in the warm-up epoch.
    assert rows["compiled-step", "automix"]["compile"] == "step" and rows["compiled-step", "automix"]["graphs"] == [1, 0]
    assert rows["compiled-step", "vanilla"]["compile"] == "step" and rows["compiled-step", "vanilla"]["graphs"] == [1, 0]
    # The static step with the compiled code: the same one graph, and every timed step from the buffers.
    for key in (("graphed-compiled-step", "automix"), ("graphed-compiled", "mixup")):
        assert rows[key]["graphs"][1] == 0 and rows[key]["static_steps"] >= 2, rows[key]
    assert rows["graphed-compiled-step", "automix"]["compile"] == "step"


def test_fp16_rows_train_with_a_loss_scaler_eager_and_from_the_static_buffers(tmp_path):
    """optimized-fp16 and graphed-fp16 run float16 autocast with GradScaler (on the CPU too): the
    rows say so, and the static-buffer row trains what the eager row trains (fused against
    unfused SGD: close, not equal)."""
    out = tmp_path / "train.json"
    code = bench_train_step.main([
        "--model", "tinynet", "--img-size", "16", "-b", "4", "--num-classes", "10", "--steps", "2", "--repeats", "1",
        "--device", "cpu", "--output", str(out), "--runs", "optimized:automix", "optimized-fp16:automix",
        "graphed-fp16:automix"])
    assert code == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert all("error" not in r and r["img_per_s"] > 0 for r in rows.values()), rows
    assert rows["optimized"]["amp_dtype"] is None and "loss_scale" not in rows["optimized"]
    for name in ("optimized-fp16", "graphed-fp16"):
        assert rows[name]["amp_dtype"] == "float16" and rows[name]["loss_scale"] > 0
    assert rows["graphed-fp16"]["static_steps"] >= 2
    eager, graphed = rows["optimized-fp16"], rows["graphed-fp16"]
    gap = max(abs(a - b) for a, b in zip(eager["weights_projection"], graphed["weights_projection"]))
    assert gap / eager["weights_norm"] < 1e-6
    assert eager["weights_projection"] != rows["optimized"]["weights_projection"]  # fp16 changed the numbers


def test_rows_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "train.json"
    code = bench_train_step.main([
        "--model", "tinynet", "--img-size", "16", "-b", "4", "--num-classes", "10", "--steps", "1", "--repeats", "1",
        "--device", "cpu", "--output", str(out), "--runs", "optimized:vanilla", "optimized:mixup", "--time-budget", "0"])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["config"], r["mix"], r["skipped"]) for r in rows] == [
        ("optimized", mix, "not started: past the 0 s budget") for mix in ("vanilla", "mixup")]


def test_graphed_compiled_rows_refuse_a_compile_mode_that_captures_graphs(capsys):
    with pytest.raises(SystemExit):
        bench_train_step.main(["--device", "cpu", "--runs", "graphed-compiled:vanilla", "--compile-mode",
                               "reduce-overhead"])
    assert "--compile-mode reduce-overhead captures CUDA graphs of its own" in capsys.readouterr().err
