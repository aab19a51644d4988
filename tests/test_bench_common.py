"""bench/common.py: benchmarks write under the working directory, never into the source tree."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_write_under_the_working_directory(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    before = sorted((ROOT / "bench" / "results").iterdir())
    monkeypatch.chdir(tmp_path)
    path = common.write_results("unit", common.environment(torch.device("cpu")), {"x": 1})
    assert (tmp_path / path).resolve().parent == (tmp_path / "output" / "bench").resolve()
    assert sorted((ROOT / "bench" / "results").iterdir()) == before
