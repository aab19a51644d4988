"""bench/gpu_check.sh and bench/gpu_summary.py: the CPU dry run of `--quick` writes one summary
with every figure of the targets (a value, or null and the reason) and the environment; the
summary tells timed-out, failed and left-out stages apart; the profile's trace arithmetic.

The dry run hides NVIDIA DALI (a stub `nvidia` package first on PYTHONPATH), as on a GPU machine
without it: the loader stage must skip DALI with a reason, not fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_summary  # noqa: E402
from common import trace_stats  # noqa: E402

# Every figure of the targets, as dotted keys of the summary's "figures".
FIGURES = [
    "automix_img_per_s.imagenet-r50", "automix_img_per_s.cifar-r18",
    "official_step_img_per_s.imagenet-r50",
    "vanilla_img_per_s.imagenet-r50.eager", "vanilla_img_per_s.imagenet-r50.compiled",
    "vanilla_img_per_s.imagenet-r50.cuda-graph-compiled",
    "vanilla_img_per_s.imagenet-r50.eager-fp16",
    *(f"automix_img_per_s_by_step.imagenet-r50.{w}" for w in ("eager", "cuda-graph", "eager-fp16", "cuda-graph-fp16")),
    *(f"automix_img_per_s_by_step.cifar-r18.{w}" for w in ("eager", "cuda-graph", "compiled-step",
                                                           "cuda-graph-compiled-step", "eager-q-batched",
                                                           "cuda-graph-q-batched")),
    "automix_fastest_way.imagenet-r50", "automix_fastest_way.cifar-r18",
    "vanilla_img_per_s_cuda_graph.cifar-r18",
    "cuda_graph_vs_eager_weights.imagenet-r50.automix", "cuda_graph_vs_eager_weights.cifar-r18.automix",
    "cuda_graph_vs_eager_weights.cifar-r18.vanilla", "cuda_graph_vs_eager_weights.cifar-r18.mixup",
    "cuda_graph_vs_eager_weights.cifar-r18.automix-compiled-step",
    "cuda_graph_vs_eager_weights.imagenet-r50.vanilla-compiled", "cuda_graph_vs_eager_weights.imagenet-r50.automix-fp16",
    *(f"mixup_vanilla_ratio.{p}.{m}" for p in ("cifar-r18", "imagenet-r18", "imagenet-r50") for m in ("eager", "compiled")),
    "mixup_vanilla_ratio.cifar-r18.cuda-graph",
    "automix_mixup_step_ratio.imagenet-r50", "automix_mixup_step_ratio.cifar-r18",
    "gpu_busy_share.cifar-r18", "gpu_busy_share.imagenet-r50",
    "launches_per_step.cifar-r18", "launches_per_step.imagenet-r50",
    "peak_mib.imagenet-r50.vanilla", "peak_mib.imagenet-r50.mixup", "peak_mib.imagenet-r50.automix",
    "peak_memory_automix_mixup_ratio.imagenet-r50",
    "copy_gbps",
    *(f"mask_mix_share_of_copy.{p}.{d}" for p in ("imagenet-r18", "imagenet-r50") for d in ("fwd", "bwd")),
    *(f"{op}_speedup_vs_torch.{p}" for op in ("attention", "mask_mix") for p in ("cifar-r18", "imagenet-r18", "imagenet-r50")),
    "attention_peak_memory_ratio.imagenet-r50",
    "attention_bwd_tiled_speedup.cifar-r18", "attention_bwd_tiled_speedup.imagenet-r18",
    "loader_img_per_s.torch-224", "loader_img_per_s.dali-224",
    "gpu_tests_failed",
]


def get(tree: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def no_dali_env(tmp_path: Path) -> dict:
    stub = tmp_path / "nodali" / "nvidia"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(stub.parent), PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               BENCH_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_quick_dry_run_writes_every_figure(tmp_path):
    env = no_dali_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--quick", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    summary = json.loads((out / "gpu-check.json").read_text())

    assert summary["mode"] == "quick" and summary["dry_run"] is True
    envrec = summary["environment"]
    for key in ("device", "python", "torch", "triton", "commit", "date"):
        assert envrec[key], key
    assert envrec["torch"] == torch.__version__ and envrec["dali"] is None  # DALI hidden
    assert set(summary["stages"]) == {"ops", "train-imagenet-r50", "train-cifar-r18", "train-imagenet-r18", "loader"}
    # every stage ran to its end (exit status 0), and the summary carries the stage records as written
    assert all(s["rc"] == 0 for s in summary["stages"].values())
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert summary["stages"] == {r["stage"]: r for r in records}

    found = dict(gpu_summary.leaves(summary["figures"]))
    assert sorted(found) == sorted(FIGURES)
    for name in FIGURES:
        fig = found[name]
        assert fig["value"] is not None or fig["reason"], name
    # Measured on the CPU: the step rates, their ratios, the torch loader.
    for name in ("automix_img_per_s.cifar-r18", "automix_img_per_s.imagenet-r50", "official_step_img_per_s.imagenet-r50",
                 "vanilla_img_per_s.imagenet-r50.eager", "mixup_vanilla_ratio.imagenet-r18.eager",
                 "automix_mixup_step_ratio.cifar-r18", "loader_img_per_s.torch-224"):
        assert found[name]["value"] > 0, name
    # The fastest way of the official step in bf16 is one of those measured (never a q-batched or
    # fp16 one, which are reported beside it), with its rate.
    for preset in ("cifar-r18", "imagenet-r50"):
        fastest = found[f"automix_fastest_way.{preset}"]
        assert set(fastest["measured"]) == {"eager", "cuda-graph"}, fastest
        assert fastest["value"] == max(fastest["measured"].values())
        assert fastest["value"] == found[f"automix_img_per_s_by_step.{preset}.{fastest['way']}"]["value"]
    fp16 = found["automix_fastest_way.imagenet-r50"]
    assert fp16["fp16_img_per_s"] == found[f"automix_img_per_s_by_step.imagenet-r50.{fp16['fp16_way']}"]["value"]
    train = json.loads((out / "train-cifar-r18.json").read_text())
    row = next(r for r in train["results"] if r["mix"] == "automix")
    assert found["automix_img_per_s.cifar-r18"]["value"] == row["img_per_s"]
    assert summary["train_rows"]["cifar-r18"]["optimized:automix"]["img_per_s"] == row["img_per_s"]
    assert summary["train_presets"]["cifar-r18"] == f"tinynet, 16 px, batch {train['setup']['batch_size']}"
    assert row["profile"]["steps"] == 1 and row["profile"]["kernels_per_step"] is None  # profiled, no GPU kernels
    # What needs CUDA, compile or DALI is null with the reason.
    for name in ("gpu_busy_share.cifar-r18", "launches_per_step.imagenet-r50", "peak_mib.imagenet-r50.automix",
                 "copy_gbps", "mask_mix_share_of_copy.imagenet-r50.fwd", "attention_speedup_vs_torch.cifar-r18",
                 "attention_bwd_tiled_speedup.imagenet-r18"):
        assert found[name]["value"] is None and "needs CUDA" in found[name]["reason"], name
    assert "no torch.compile" in found["vanilla_img_per_s.imagenet-r50.compiled"]["reason"]
    # The static step runs on the CPU too (without capture): its rates are measured.
    for name in ("automix_img_per_s_by_step.cifar-r18.cuda-graph", "automix_img_per_s_by_step.imagenet-r50.cuda-graph",
                 "vanilla_img_per_s_cuda_graph.cifar-r18", "mixup_vanilla_ratio.cifar-r18.cuda-graph",
                 "automix_img_per_s_by_step.cifar-r18.eager-q-batched",
                 "automix_img_per_s_by_step.cifar-r18.cuda-graph-q-batched",
                 "automix_img_per_s_by_step.imagenet-r50.eager-fp16", "automix_img_per_s_by_step.imagenet-r50.cuda-graph-fp16",
                 "vanilla_img_per_s.imagenet-r50.eager-fp16"):
        assert found[name]["value"] > 0, name
    # ... and trains what the eager step trains (the CPU's unfused SGD against the static step's fused one).
    for name in ("cuda_graph_vs_eager_weights.imagenet-r50.automix", "cuda_graph_vs_eager_weights.imagenet-r50.automix-fp16",
                 "cuda_graph_vs_eager_weights.cifar-r18.automix",
                 "cuda_graph_vs_eager_weights.cifar-r18.vanilla", "cuda_graph_vs_eager_weights.cifar-r18.mixup"):
        assert 0 <= found[name]["value"] < 1e-7 and found[name]["static_steps"] >= 1, name
    assert found["automix_img_per_s_by_step.cifar-r18.compiled-step"]["reason"] == (
        "compiled-step:automix is not part of gpu_check.sh --quick --dry-run (no torch.compile on the CPU)")
    assert "DALI is not installed" in found["loader_img_per_s.dali-224"]["reason"]
    assert "did not run" in found["gpu_tests_failed"]["reason"]


def write(path: Path, data) -> None:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_summary_reasons_and_figures_from_stage_files(tmp_path):
    """A GPU run's files, made by hand: one stage timed out part-way, one failed, one not run."""
    meta = {"device": "NVIDIA H200", "gpu": "NVIDIA H200"}
    write(tmp_path / "env.json", {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.3",
                                  "commit": "abc", "date": "d", "mode": "quick", "dry_run": False})
    write(tmp_path / "stages.jsonl", "".join(json.dumps(s) + "\n" for s in (
        {"stage": "ops", "rc": 0, "seconds": 30.0, "limit_s": 45},
        {"stage": "train-imagenet-r50", "rc": 124, "seconds": 100.0, "limit_s": 100},
        {"stage": "train-cifar-r18", "rc": 1, "seconds": 5.0, "limit_s": 65},
    )))
    setup = {"model": "resnet50", "img_size": 224, "batch_size": 128,
             "runs": ["optimized:vanilla", "optimized:mixup", "optimized:automix", "graphed-compiled:vanilla",
                      "compiled:vanilla"]}
    prof = {"steps": 3, "kernels_per_step": 3400.0, "kernel_ms_per_step": 80.0, "busy_ms_per_step": 90.0,
            "busy_share_in_trace": 0.5, "gpu_busy_share": 0.9}
    write(tmp_path / "train-imagenet-r50.json", {"meta": meta, "setup": setup, "results": [
        {"config": "optimized", "mix": "vanilla", "img_per_s": 4000.0, "step_ms": 32.0, "peak_mib": 10000.0},
        {"config": "optimized", "mix": "mixup", "img_per_s": 3900.0, "step_ms": 32.8, "peak_mib": 10500.0},
        {"config": "optimized", "mix": "automix", "img_per_s": 1300.0, "step_ms": 98.4, "peak_mib": 21000.0, "profile": prof},
        {"config": "graphed-compiled", "mix": "vanilla", "skipped": "not started: past the 76 s budget"},
    ]})
    rows = [{"op": "mask_mix-nearest", "preset": "imagenet-r50", "provider": "triton", "pass": "fwd", "ms": 0.1, "gbps": 3600.0,
             "peak_extra_mib": 1.0},
            {"op": "attention", "preset": "imagenet-r50", "provider": "triton", "pass": "fwd+bwd", "ms": 0.2, "peak_extra_mib": 50.0},
            {"op": "attention", "preset": "imagenet-r50", "provider": "torch", "pass": "fwd+bwd", "ms": 0.8, "peak_extra_mib": 200.0},
            {"op": "attention", "preset": "cifar-r18", "provider": "triton", "error": "RuntimeError: boom"},
            {"op": "attention", "preset": "imagenet-r18", "provider": "triton", "pass": "bwd", "ms": 0.45, "peak_extra_mib": 9.0},
            {"op": "attention", "preset": "imagenet-r18", "provider": "triton-tiled", "pass": "bwd", "ms": 0.3,
             "peak_extra_mib": 9.0}]
    write(tmp_path / "ops.json", {"meta": {**meta, "copy_gbps": 4000.0}, "results": rows})

    figs = dict(gpu_summary.leaves(gpu_summary.summarize(tmp_path)["figures"]))
    assert figs["automix_img_per_s.imagenet-r50"]["value"] == 1300.0
    assert figs["mixup_vanilla_ratio.imagenet-r50.eager"]["value"] == round(3900 / 4000, 3)
    assert figs["mixup_vanilla_ratio.imagenet-r50.eager"]["target"] == gpu_summary.MIXUP_TARGET == 0.95
    assert figs["automix_mixup_step_ratio.imagenet-r50"]["value"] == round(98.4 / 32.8, 3)
    assert figs["peak_memory_automix_mixup_ratio.imagenet-r50"]["value"] == round(21000 / 10500, 3)
    assert figs["gpu_busy_share.imagenet-r50"]["value"] == 0.9
    assert figs["launches_per_step.imagenet-r50"]["value"] == 3400.0
    assert figs["copy_gbps"]["value"] == 4000.0
    assert figs["mask_mix_share_of_copy.imagenet-r50.fwd"]["value"] == 0.9
    assert figs["attention_speedup_vs_torch.imagenet-r50"]["value"] == 4.0
    assert figs["attention_peak_memory_ratio.imagenet-r50"]["value"] == 0.25
    assert figs["attention_bwd_tiled_speedup.imagenet-r18"]["value"] == 1.5
    # Of AutoMix's ways only eager was measured at imagenet-r50, none at cifar-r18: no choice either.
    assert figs["automix_fastest_way.imagenet-r50"]["reason"] == (
        "fewer than two ways of running AutoMix's step were measured here (eager)")
    assert figs["automix_fastest_way.cifar-r18"]["reason"] == (
        "fewer than two ways of running AutoMix's step were measured here (none)")
    # Planned but cut off by the time limit / never planned in this mode / a failed row / a failed stage.
    assert figs["vanilla_img_per_s.imagenet-r50.compiled"]["reason"] == (
        "stage train-imagenet-r50 timed out after 100 s before measuring compiled:vanilla")
    assert "compiled:mixup is not part of gpu_check.sh --quick" in figs["mixup_vanilla_ratio.imagenet-r50.compiled"]["reason"]
    assert figs["vanilla_img_per_s.imagenet-r50.cuda-graph-compiled"]["reason"] == (
        "graphed-compiled:vanilla not started: past the 76 s budget")
    assert "RuntimeError: boom" in figs["attention_speedup_vs_torch.cifar-r18"]["reason"]
    assert figs["automix_img_per_s.cifar-r18"]["reason"] == "stage train-cifar-r18 failed (exit 1; see train-cifar-r18.log)"
    assert figs["automix_img_per_s_by_step.cifar-r18.compiled-step"]["reason"] == figs["automix_img_per_s.cifar-r18"]["reason"]
    assert figs["mask_mix_share_of_copy.imagenet-r50.bwd"]["reason"] == (
        "mask_mix-nearest imagenet-r50 triton bwd was not measured")
    assert "stage loader did not run" in figs["loader_img_per_s.torch-224"]["reason"]
    assert all(f["value"] is not None or f["reason"] for f in figs.values())


def test_fastest_way_leaves_out_what_changes_the_step_or_its_precision():
    ways = {"eager": {"value": 100.0}, "cuda-graph": {"value": 150.0}, "eager-q-batched": {"value": 300.0},
            "eager-fp16": {"value": 200.0}, "cuda-graph-fp16": {"value": None, "reason": "skipped"}}
    fig = gpu_summary.fastest_way(ways)
    assert (fig["way"], fig["value"], fig["over_eager"]) == ("cuda-graph", 150.0, 1.5)
    assert fig["measured"] == {"eager": 100.0, "cuda-graph": 150.0}
    assert (fig["fp16_way"], fig["fp16_img_per_s"]) == ("eager-fp16", 200.0)


def test_trace_stats_counts_kernels_and_busy_union():
    events = [
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},      # overlaps a: busy 0-15
        {"cat": "gpu_memcpy", "name": "c", "ts": 20, "dur": 5},   # busy 20-25
        {"cat": "kernel", "name": "d", "ts": 30, "dur": 2},       # busy 30-32
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 3},
        {"cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 50},
        {"cat": "ac2g", "name": "flow", "ts": 1},
    ]
    s = trace_stats(events, steps=2)
    assert s["kernels_per_step"] == 1.5
    assert s["kernel_ms_per_step"] == round(22 / 1e3 / 2, 4)
    assert s["busy_ms_per_step"] == round(22 / 1e3 / 2, 4)  # (15 + 5 + 2) us over 2 steps
    assert s["span_ms"] == 0.032
    assert s["counts"] == {"kernel": 3, "gpu_memcpy": 1, "gpu_memset": 0}
    empty = trace_stats([e for e in events if e["cat"] in ("cpu_op", "cuda_runtime")], steps=2)
    assert empty["kernels_per_step"] is None and empty["busy_ms_per_step"] is None


def test_gpu_check_refuses_a_bad_option_and_a_machine_without_cuda(tmp_path):
    env = no_dali_env(tmp_path)
    script = str(ROOT / "bench" / "gpu_check.sh")
    bad = subprocess.run(["bash", script, "--quik"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --quik (expected --quick, --dry-run)"
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = subprocess.run(["bash", script, "--quick"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device visible to torch")
    assert not (tmp_path / "out" / "stages.jsonl").read_text()  # no stage ran
