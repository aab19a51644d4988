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
    """output/bench/<kind>-<device>-<date>.json unless an explicit path is given."""
    path = Path(output) if output else results_path(kind, device_slug(env))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": env, **payload}, indent=2) + "\n")
    return path
