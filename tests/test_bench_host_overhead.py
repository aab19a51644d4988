"""bench/bench_host_overhead.py: the JSON it writes under each --allocator, and its error when
the C library cannot be set to cache. No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_host_overhead.py"
PRESETS = ("cifar-r18", "imagenet-r50")
# Kernel launches per call: the attention backward is two kernels, the nearest mask backward one.
LAUNCHES = {("attention", "fwd"): 1, ("attention", "fwd_nograd"): 1, ("attention", "bwd"): 2,
            ("mask_mix", "fwd"): 1, ("mask_mix", "fwd_nograd"): 1, ("mask_mix", "bwd"): 1}
FIELDS = {"op", "preset", "dtype", "pass_", "launches", "median_us", "p90_us", "bare_median_us"}


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_host_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("allocator", ["caching", "system"])
def test_every_row_is_written_with_the_allocator_recorded(tmp_path, allocator):
    """main() in a child process (--allocator caching changes malloc for the whole process, which
    must not outlive the test): one row per op, pass, preset and dtype, each with its timings and
    the launches its op makes."""
    out = tmp_path / "host.json"
    argv = ["--allocator", allocator, "--presets", *PRESETS, "--calls", "20", "--output", str(out)]
    code = (f"import sys; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_host_overhead as b; "
            f"sys.exit(b.main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["allocator"] == allocator and f"CPU allocator: {allocator}" in result["method"]
    rows = result["results"]
    assert {(r["op"], r["preset"], r["dtype"], r["pass_"]) for r in rows} == {
        (op, preset, dtype, pass_) for (op, pass_) in LAUNCHES for preset in PRESETS for dtype in ("fp32", "bf16")}
    assert len(rows) == len(LAUNCHES) * len(PRESETS) * 2
    for row in rows:
        assert set(row) == FIELDS
        assert row["launches"] == LAUNCHES[row["op"], row["pass_"]], row
        assert all(row[k] > 0 for k in ("median_us", "p90_us", "bare_median_us")), row


class _NoMallopt:
    """A C library without mallopt (musl, macOS)."""


class _RefusingMallopt:
    """A C library whose mallopt refuses every setting (returns 0)."""

    def __init__(self):
        self.mallopt = lambda param, value: 0


@pytest.mark.parametrize("libc, problem", [(_NoMallopt, "lacks"), (_RefusingMallopt, "mallopt(M_MMAP_MAX, 0) failed")])
def test_caching_without_a_working_mallopt_is_a_one_line_error(monkeypatch, tmp_path, libc, problem):
    bench = _bench()
    monkeypatch.setattr(bench.ctypes, "CDLL", lambda name: libc())
    with pytest.raises(SystemExit) as exc:
        bench.main(["--presets", "cifar-r18", "--calls", "1", "--output", str(tmp_path / "host.json")])
    message = str(exc.value)
    assert problem in message and "--allocator system" in message and "\n" not in message
    assert not (tmp_path / "host.json").exists()


def test_caching_sets_no_mmap_no_trim_and_a_256_mib_top_pad(monkeypatch):
    """The settings as glibc's malloc.h numbers them: M_MMAP_MAX -4, M_TRIM_THRESHOLD -1 (-1:
    never trim), M_TOP_PAD -2."""
    calls = []

    class Libc:
        def __init__(self):
            self.mallopt = lambda param, value: calls.append((param, value)) or 1

    bench = _bench()
    monkeypatch.setattr(bench.ctypes, "CDLL", lambda name: Libc())
    bench.use_caching_allocator()
    assert sorted(calls) == sorted([(-4, 0), (-1, -1), (-2, 256 << 20)])
