"""Ahead-of-time compile of every kernel specialization the launchers choose, for sm_80 and sm_90.

No GPU is needed: bench/aot_compile.py records the launches of the real Mix Block at each
preset (meta tensors, nothing runs), compiles each distinct specialization with triton for
both targets, and reads registers, spills and shared memory from the bundled ptxas and the
width of the image loads from the PTX. This test holds its budgets (see budget_violations).
It runs the script in a subprocess without TRITON_INTERPRET, which conftest sets here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import aot_compile  # noqa: E402

from automix_fast.kernels import launches  # noqa: E402

LAUNCHED = {"mask_mix": {"_fwd", "_bwd_nearest", "_bwd_rows", "_bwd_cols"},
            "mixblock_attention": {"_fwd", "_bwd_dq", "_bwd_dkdv"}}


def test_recording_captures_every_kernel_without_running_it():
    captured = aot_compile.capture(presets=["cifar-r18"], dtypes=["bf16"], layouts=["channels_last"],
                                   modes=["nearest", "bilinear"])
    seen = {(rec.module.rsplit(".", 1)[-1], rec.name) for _, rec in captured}
    assert seen == {(m, k) for m, ks in LAUNCHED.items() for k in ks}
    assert {ctx["pass_"] for ctx, _ in captured} == {"fwd", "bwd"}
    mask_bwd = {mode: [rec.name for ctx, rec in captured if ctx["mode"] == mode and ctx["pass_"] == "bwd"
                       and rec.module.endswith("mask_mix")] for mode in ("nearest", "bilinear")}
    assert mask_bwd == {"nearest": ["_bwd_nearest"], "bilinear": ["_bwd_rows", "_bwd_cols"]}
    attn_fwd = next(rec for ctx, rec in captured if rec.name == "_fwd" and "attention" in rec.module)
    assert attn_fwd.grid == (1, 100)  # L = 64 queries in one block, one program per sample
    assert launches.active() is None


def test_recording_accepts_meta_tensors_and_keeps_slice_alignment():
    base = torch.empty(4, 10, 8, device="meta", dtype=torch.bfloat16)
    q, v = base[..., :7], base[..., 7]
    assert launches.TensorArg.of(q).address % 16 == 0
    assert launches.TensorArg.of(v).address % 16 == 14  # 7 bf16 elements past an aligned base


@pytest.mark.slow
def test_every_specialization_compiles_for_sm80_and_sm90_within_budget(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_compile.py"), "--output", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["meta"]["targets"]) == {"sm_80", "sm_90"}
    kernels = {(k["module"].rsplit(".", 1)[-1], k["kernel"]) for k in report["kernels"]}
    assert kernels == {(m, k) for m, ks in LAUNCHED.items() for k in ks}
    combos = {(u["preset"], u["dtype"], u["layout"], u["mode"], u["lam_concat"]) for u in report["launches"]}
    assert len(combos) == 5 * 3 * 2 * 2  # 4 presets, ImageNet ResNet-50 with and without lam_concat
    violations = aot_compile.budget_violations(report)
    assert not violations, "\n".join(violations)
    assert res.returncode == 0, res.stdout[-3000:]
