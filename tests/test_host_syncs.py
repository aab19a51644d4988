"""No host syncs inside a training step, counted at the dispatcher on CPU, per mixing policy.

A non-log step must make none; a log step exactly the two reads the loop is built around (the
interval's metrics and skip count in one `.tolist()`, the bad-step counter in one `.item()`).
Under torchrun (2 gloo processes) the same, with the ranks' stop agreement riding in the log
step's metrics all-reduce. See tests/synccount.py for what is counted and why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faultkit import GLOO_ABORT, free_port
from synccount import SyncCounter, run_steps

LOG_STEP_READS = sorted([".tolist()", "_local_scalar_dense"])
POLICIES = ["vanilla", "mixup", "cutmix", "automix"]


@pytest.mark.parametrize("policy", POLICIES)
def test_no_host_sync_in_a_step_but_the_log_reads(policy):
    per_step, result, _, _ = run_steps(policy)
    assert result.steps == 3
    assert per_step[0] == [] and per_step[1] == [], f"{policy}: syncs in non-log steps: {per_step[:2]}"
    assert sorted(per_step[2]) == LOG_STEP_READS, f"{policy}: log step: {per_step[2]}"


def test_automix_step_on_the_triton_host_path_has_no_host_sync():
    per_step, result, _, _ = run_steps("automix", backend="triton")  # kernel launches recorded, not run
    assert result.steps == 3
    assert per_step[0] == [] and per_step[1] == [], per_step[:2]
    assert sorted(per_step[2]) == LOG_STEP_READS, per_step[2]


def test_the_counter_sees_what_would_sync():
    counter = SyncCounter()
    t = torch.arange(6.0)
    with counter.host_methods(), counter:
        t.sum().item()
        t[t > 2]
        torch.nonzero(t)
        t.tolist()
        t + 1  # not a sync
    assert counter.seen == ["_local_scalar_dense", "boolean-mask index", "nonzero", ".tolist()"]


def _torchrun(tmp_path: Path, *args: str) -> list[dict]:
    """Run synccount.py on 2 gloo processes; their records. A rank that aborts in gloo's own
    threads ("terminate called without an active exception", SIGABRT; rare, and not reproducible
    on demand) gets one more run, in a fresh folder; any other failure fails at once."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(here / "synccount.py"), args[0], str(out), *args[1:]]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if res.returncode == 0 or GLOO_ABORT not in res.stderr + res.stdout:
            break
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["vanilla", "automix"])
def test_two_process_step_has_no_host_sync_but_the_log_reads(policy, tmp_path):
    for rank in _torchrun(tmp_path, policy):
        assert rank["steps"] == 3
        assert rank["per_step"][0] == [] and rank["per_step"][1] == [], rank["per_step"]
        assert sorted(rank["per_step"][2]) == LOG_STEP_READS, rank["per_step"][2]


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_is_skipped_and_counted_on_every_rank(tmp_path):
    r0, r1 = _torchrun(tmp_path, "vanilla", "--bad-loss-rank", "1")
    assert r0["skipped"] == r1["skipped"] == 1  # GradScaler skipped it everywhere, and the count says so
    assert r0["scale"] == r1["scale"] == 2.0 ** 7  # backed off once, on both ranks
    assert r0["state"] == r1["state"]  # the ranks still hold the same weights


def test_gradscaler_skips_a_nonfinite_loss_with_finite_gradients_and_counts_it():
    from automix_fast.engine.train_step import StepGuard, optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = StepGuard(torch.device("cpu"))
    for bad, expect_w in ((1.0, 1.0), (0.0, 0.9)):
        opt.zero_grad()
        scaler.scale(w.sum()).backward()  # finite gradients, 1 each
        found = optimizer_step(opt, [w], guard, scaler, torch.tensor([bad]))
        assert found.item() == bad
        torch.testing.assert_close(w.detach(), torch.full((3,), expect_w))
    assert scaler.get_scale() == 2.0  # backed off once, for the skipped step
