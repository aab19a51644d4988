"""bench/bench_memory.py: the peak memory of one step per policy, measured on the CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_automix_step_peaks_within_the_target_of_mixup_and_below_one_backward(tmp_path):
    """The AutoMix step as the engine runs it (each branch backpropagated before the next is
    built) allocates at most 2.2x a mixup step at its peak; backpropagated once at the end, the
    three backbone graphs alive together, it allocates more than that."""
    out = tmp_path / "memory.json"
    assert _bench().main(["--model", "tinynet", "--batch-size", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    peaks = {r["row"]: r["peak_mib"] for r in result["rows"]}
    assert set(peaks) == {"vanilla", "mixup", "automix", "automix-one-backward", "automix-q-batched"}
    assert 0 < peaks["vanilla"] <= peaks["mixup"]
    assert result["ratios"]["automix/mixup"] <= 2.2
    assert peaks["automix"] < 0.6 * peaks["automix-one-backward"]
    # --q-batched keeps both of q's graphs alive together: above the part-by-part step.
    assert peaks["automix"] < peaks["automix-q-batched"] and "automix-q-batched/mixup" in result["ratios"]
    assert result["meta"]["torch"] and result["config"]["model"] == "tinynet"
