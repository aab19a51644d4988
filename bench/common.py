"""What every benchmark records next to its numbers: machine, library versions, git commit."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Results go to the working directory's output/bench/, like training runs go to output/: running
# a benchmark never writes into the source tree. bench/results/ holds the ones kept in git; pass
# --output bench/results/NAME.json to add one there.
RESULTS = Path("output") / "bench"


def results_path(kind: str, slug: str, suffix: str = "") -> Path:
    """output/bench/<kind>-<device>-<date><suffix>.json (relative to the working directory)."""
    return RESULTS / f"{kind}-{slug}-{dt.date.today().isoformat()}{suffix}.json"


def git_commit() -> str:
    """HEAD's sha, with '-dirty' when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record its absence, never fail the benchmark
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu: {cpu_name()}",
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpu": cpu_name(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "numpy": _version("numpy"),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(env: dict) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"] or "cpu").strip("-").lower()


def write_results(kind: str, env: dict, payload: dict, output: str | Path | None = None) -> Path:
    """output/bench/<kind>-<device>-<date>.json unless an explicit path is given; written in one
    rename, so a run killed mid-write leaves the previous version."""
    from automix_fast.atomic import write_json

    return write_json(Path(output) if output else results_path(kind, device_slug(env)), {"meta": env, **payload})


# Chrome-trace categories of device activity (torch.profiler / kineto): what counts as the GPU busy.
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_stats(events: list[dict], steps: int) -> dict:
    """Per-step device activity of a chrome trace's `traceEvents` covering `steps` steps.

    `kernels_per_step`: kernel events (launches that ran) per step; `kernel_ms_per_step`: the sum
    of their durations; `busy_ms_per_step`: the union of kernel, memcpy and memset intervals (what
    overlaps across streams counted once); `span_ms`: first device event start to last end.
    Device figures are None when the trace holds no device activity (a CPU run)."""
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    kernels = [e for e in device if e["cat"] == "kernel"]
    counts = {cat: sum(e["cat"] == cat for e in device) for cat in DEVICE_CATEGORIES}
    if not device:
        return {"steps": steps, "kernels_per_step": None, "kernel_ms_per_step": None, "busy_ms_per_step": None,
                "span_ms": None, "counts": counts}
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device):
        if start >= end:
            busy += stop - start
        elif stop > end:
            busy += stop - end
        end = max(end, stop)
    first = min(float(e["ts"]) for e in device)
    return {
        "steps": steps,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "kernel_ms_per_step": round(sum(float(e["dur"]) for e in kernels) / 1e3 / steps, 4),
        "busy_ms_per_step": round(busy / 1e3 / steps, 4),
        "span_ms": round((end - first) / 1e3, 3),
        "counts": counts,
    }


def profile_run(fn, device: torch.device, steps: int, keep: str | Path | None = None) -> dict:
    """Run fn() (which runs `steps` steps and waits for the device) under torch.profiler.

    Returns trace_stats plus `wall_ms` (fn's wall time under the profiler) and `busy_share_in_trace`
    (device busy time / wall time). The trace is kept gzipped at `keep` when given."""
    import gzip
    import tempfile
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        raw = path.read_bytes()
    if keep is not None:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(keep, "wb") as f:
            f.write(raw)
    stats = trace_stats(json.loads(raw).get("traceEvents", []), steps)
    stats["wall_ms"] = round(wall * 1e3, 3)
    busy = stats["busy_ms_per_step"]
    stats["busy_share_in_trace"] = None if busy is None else round(busy * steps / stats["wall_ms"], 4)
    if keep is not None:
        stats["trace"] = Path(keep).name
    return stats
