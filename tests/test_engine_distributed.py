"""DDP under torchrun on CPU (gloo): 2 processes against 1, rank agreement, the sharding they rely on.

See docs/DISTRIBUTED.md. The exact 2-vs-1 match uses `--mix vanilla --sync-bn`: with equal per-rank
batches the mean of the per-rank gradients is the global-batch gradient, SyncBatchNorm makes the
batch statistics global, and the loader gives rank r the r-th of every world_size samples of the
epoch order (with the same augmentation draws), so rank 0 + rank 1 with batch B see exactly the
samples one process with batch 2B sees at each step. AutoMix/mixup pair images within each rank's
shard, so they differ from a 1-process run by design; for them the test checks that every rank
holds the same Mix Block, momentum encoder and weights.
"""
from __future__ import annotations

import re

import pytest
import torch

from automix_fast.engine import distributed
from automix_fast.errors import ConfigError
from faultkit import (assert_states_equal, cli, make_folder, records, steps_text, torchrun, train_args, train_losses,
                      weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ddp") / "data")


def test_two_processes_match_one_process(data, tmp_path):
    common = ["--mix", "vanilla", "--sync-bn", "--seed", "3"]
    one = cli(train_args(data, tmp_path, "one", *common, batch=16))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, train_args(data, tmp_path, "two", *common, batch=8))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "cpu x2" in two.stdout  # really ran distributed
    # The start line says how the global batch is made (the lr is never rescaled for it).
    assert ", batch 8 x 2 procs = 16, lr 0.05" in two.stdout and ", batch 16, lr 0.05" in one.stdout

    # Throughput counts both ranks' images (timm's "Rate"): the rate logged at step k of epoch 1
    # implies the seconds that 16 k images took; between steps 1 and 3 that matches rank 0's clock
    # (a per-rank rate would imply twice as long).
    steps = records(tmp_path / "two")[:3]
    implied = [16 * (k + 1) / r["values"]["img_per_s_global"] for k, r in enumerate(steps)]
    assert implied[2] - implied[0] == pytest.approx(steps[2]["time"] - steps[0]["time"], rel=0.4)
    # The epoch's "done:" line gives the same whole-epoch rate, labelled.
    done = re.search(r"epoch 1/2 done: 3 steps in [\d.]+s .* img/s (\d+) \(2 procs\)", two.stdout)
    assert done, two.stdout[-2000:]
    assert int(done[1]) == pytest.approx(steps[2]["values"]["img_per_s_global"], rel=0.3)
    assert "procs)" not in one.stdout  # one process: no label

    # Same number of logged steps (only rank 0 writes), same global-batch losses per step.
    l1, l2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 2 * 3  # 60 images // 16 per step = 3 steps per epoch
    # float32 sums in another order (per-rank means, all-reduce, SyncBN) drift by ~1e-5 relative.
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    # Final weights and BN statistics within float tolerance: the summation order differs (per-rank
    # means then an all-reduce, against one global mean), and as the loss falls from 1.2 to 0.05 over
    # the 6 steps that ~1e-7 drift grows to ~1e-4 in the stem's weights (after epoch 1: ~2e-7).
    assert_states_equal(weights(tmp_path / "two" / "last.pt"), weights(tmp_path / "one" / "last.pt"), atol=2e-4)
    # Global accuracy: every one of the 21 val images counted once over the two ranks.
    e1, e2 = records(tmp_path / "one", "eval")[-1]["values"], records(tmp_path / "two", "eval")[-1]["values"]
    assert e1["count"] == e2["count"] == 21
    assert e2["one_top1"] == pytest.approx(e1["one_top1"])
    assert "one" in two.stdout and "top-1" in two.stdout  # the summary reports the global accuracy


def test_automix_ranks_hold_identical_mix_block_and_momentum_encoder(data, tmp_path):
    dump = tmp_path / "ranks"
    run = torchrun(2, train_args(data, tmp_path, "am", "--mix", "automix", epochs=1, batch=8),
                   env={"AUTOMIX_FAST_RANK_STATE_DIR": str(dump)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert any(k.startswith("mix_block.") for k in params) and any(k.startswith("momentum_encoder.") for k in params)
    assert_states_equal(r0, r1, keys=params)  # bitwise: same all-reduced gradients, same EMA
    # BN running statistics are per rank between syncs and averaged before evaluation/checkpoints.
    assert_states_equal(r0, r1, atol=1e-6)
    # Rank 0's checkpoint is what the ranks hold; the eval count covers the whole val set.
    assert_states_equal(weights(tmp_path / "am" / "last.pt"), r0, keys=params)
    assert records(tmp_path / "am", "eval")[-1]["values"]["count"] == 21
    # Only rank 0 logged: one train record per step (60 images // (2 x 8) = 3 steps).
    assert len(records(tmp_path / "am")) == 3


def test_cuda_graph_step_under_torchrun_trains_as_the_eager_step(data, tmp_path):
    """`--cuda-graph` under torchrun (the static-buffer step, uncaptured on the CPU): the ranks
    all-reduce the same gradients and hold bitwise the same weights, and the run follows the eager
    two-process run (which updates with torch's unfused SGD on the CPU: the last bits differ)."""
    dump = tmp_path / "ranks"
    common = ["--mix", "automix", "--mix-block-every", "2", "--seed", "5"]
    eager = torchrun(2, train_args(data, tmp_path, "eager", *common, epochs=1, batch=8))
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    graph = torchrun(2, train_args(data, tmp_path, "graph", *common, "--cuda-graph", epochs=1, batch=8),
                     env={"AUTOMIX_FAST_RANK_STATE_DIR": str(dump)})
    assert graph.returncode == 0, graph.stdout[-3000:] + graph.stderr[-3000:]
    assert "cpu x2" in graph.stdout and "static buffers" in graph.stdout
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert_states_equal(r0, r1, keys=params)
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "graph")),
                               torch.tensor(train_losses(tmp_path / "eager")), rtol=1e-4, atol=1e-6)
    assert_states_equal(weights(tmp_path / "graph" / "last.pt"), weights(tmp_path / "eager" / "last.pt"), atol=1e-5)


# Builds the Trainer of a --drop-path run and prints, per rank, the keep masks its last DropPath
# draws for 16 samples: after the build and after loading a mid-epoch training state.
DROP_PATH_MASKS = """
import json, os, sys
import torch
from automix_fast.config import build_config
from automix_fast.engine.distributed import cleanup
from automix_fast.engine.runner import Trainer
from automix_fast.models.drop_path import DropPath

cfg = build_config(overrides=dict(model="resnet20_cifar", drop_path=0.5, mix="mixup", epochs=1, device="cpu",
                                  data_dir=sys.argv[1], img_size=32, batch_size=8, workers=0, loader="torch",
                                  kernel_backend="torch", output=sys.argv[2], experiment="masks", visualize=False))
t = Trainer(cfg, quiet=True)
drop = [m for m in t.model.modules() if isinstance(m, DropPath)][-1]
drop.train()
keep = lambda: (drop(torch.ones(16, 1, 1, 1)).flatten() != 0).int().tolist()
built = keep()
t.load_state("state", t.state(0, 2))
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "built": built, "resumed": keep()}), flush=True)
cleanup()
"""


def test_drop_path_masks_differ_between_ranks_and_one_process_draws_as_rank_0(data, tmp_path):
    """Under torchrun every rank builds the same weights from --seed, then ranks other than 0 draw
    from their own generator streams, also after a resume (which restores rank 0's generator
    state on every rank); rank 0 keeps the stream a single process has."""
    import json
    import subprocess
    import sys

    from faultkit import ENV, free_port

    script = tmp_path / "masks.py"
    script.write_text(DROP_PATH_MASKS)
    args = [str(script), str(data), str(tmp_path)]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), *args],
                         env=ENV, capture_output=True, text=True, timeout=180)
    one = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    masks = {r["rank"]: r for r in map(json.loads, [ln for ln in two.stdout.splitlines() if ln.startswith("{")])}
    assert set(masks) == {0, 1}, two.stdout[-3000:] + two.stderr[-3000:]
    single = json.loads(one.stdout.strip().splitlines()[-1])
    for when in ("built", "resumed"):
        assert masks[0][when] != masks[1][when], f"{when}: both ranks drew the keep mask {masks[0][when]}"
        assert masks[0][when] == single[when], f"{when}: rank 0 {masks[0][when]}, one process {single[when]}"


def test_rank_shards_reassemble_the_global_batch():
    """Rank r's batch k + ... == the 1-process batch k of size world*B, with the same crops/flips."""
    from automix_fast.data import DataSpec
    from automix_fast.data.torch_loader import ResidentLoader

    n, b = 37, 4
    images = torch.arange(n * 8 * 8 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(n, 8, 8, 3)
    labels = torch.arange(n)

    def batches(rank, world, bs):
        spec = DataSpec(img_size=8, batch_size=bs, rank=rank, world_size=world, seed=7)
        loader = ResidentLoader(images, labels, spec, train=True, aug="cifar")
        loader.set_epoch(2)
        return list(loader)

    single = batches(0, 1, 2 * b)
    ranks = [batches(r, 2, b) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 37 // 8
    for k, (x, y) in enumerate(single):
        (x0, y0), (x1, y1) = ranks[0][k], ranks[1][k]
        assert sorted(y.tolist()) == sorted(y0.tolist() + y1.tolist())
        got = {int(l): img for l, img in zip(torch.cat([y0, y1]), torch.cat([x0, x1]))}
        for l, img in zip(y, x):
            assert torch.equal(got[int(l)], img), "augmentation differs between 1 and 2 ranks"


def test_cpu_sync_batchnorm_is_batchnorm_in_one_process():
    from automix_fast.engine.distributed import CPUSyncBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    sync = convert_sync_batchnorm(__import__("copy").deepcopy(bn), torch.device("cpu"))
    assert isinstance(sync[1], CPUSyncBatchNorm)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(sync(x), bn(x))
    assert_states_equal(sync.state_dict(), bn.state_dict())


def test_sigterm_to_torchrun_stops_all_ranks_at_one_step_and_resumes(data, tmp_path):
    """torchrun forwards SIGTERM to every worker; the ranks agree on the stop step (a rank leaving
    alone would hang the others in the next all-reduce), rank 0 writes last.pt, and a torchrun
    with --resume auto finishes the run."""
    import signal
    import subprocess
    import sys
    import time

    from automix_fast.engine.checkpoint import load_checkpoint
    from faultkit import ENV, free_port

    args = train_args(data, tmp_path, "pre", "--mix", "automix", batch=2)  # 15 steps per epoch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "automix_fast", *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        seen, t0 = [], time.monotonic()
        for line in proc.stdout:
            seen.append(line)
            if "epoch 1/2 [" in line:
                break
            assert time.monotonic() - t0 < 120, "no progress"
        proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which passes it to the workers
        out = "".join(seen) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    # (torchrun's agent exits non-zero after a SIGTERM, as do the workers: 143.)
    assert out.count("received SIGTERM") == 2 and "stopped by SIGTERM" in out, out[-3000:]
    assert f"continue with: torchrun --nproc_per_node 2 $(which automix-fast) train --resume auto --output {tmp_path} " \
           "--experiment pre" in out
    state = load_checkpoint(tmp_path / "pre" / "last.pt")
    assert state["next_epoch"] == 0 and 0 < state["next_batch"] < 15
    resumed = torchrun(2, args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"batch {state['next_batch']}" in resumed.stdout and "done:" in resumed.stdout
    assert len(records(tmp_path / "pre")) == 2 * 15  # every step logged once over the two runs


def test_two_ranks_resume_a_streaming_epoch_with_grad_accum_as_if_uninterrupted(data, tmp_path):
    """2 ranks, the streaming loader (72 px: random-resized crops, files decoded per batch), 2
    micro-batches per step, stopped by SIGTERM mid-epoch: each rank starts its own shard at the
    batch resumed at (the line says nothing was replayed), and the run ends on the uninterrupted
    run's per-step losses and weights, bit for bit."""
    import signal

    from automix_fast.engine.checkpoint import load_checkpoint
    from faultkit import run_until

    # --sync-bn: every rank holds the same BN statistics, so the checkpoint (rank 0's) restores them all.
    common = ["--mix", "vanilla", "--sync-bn", "--seed", "4", "--grad-accum-steps", "2", "--img-size", "72"]
    ref = torchrun(2, train_args(data, tmp_path, "ref", *common, batch=2, epochs=1))  # 15 batches: 8 steps
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    args = train_args(data, tmp_path, "pre", *common, batch=2, epochs=1)
    proc = _torchrun_popen(2, args)
    try:
        run_until(proc, "epoch 1/1 [", timeout=120)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert "stopped by SIGTERM" in out, out[-3000:]
    at = load_checkpoint(tmp_path / "pre" / "last.pt")["next_batch"]
    assert 0 < at < 8
    resumed = torchrun(2, args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"epoch 1/1 done: {steps_text(8 - at)} (resumed at step {at} of 8) in " in resumed.stdout
    assert train_losses(tmp_path / "pre") == train_losses(tmp_path / "ref")
    assert_states_equal(weights(tmp_path / "pre" / "last.pt"), weights(tmp_path / "ref" / "last.pt"))


def _torchrun_popen(nproc: int, args: list[str]):
    import subprocess
    import sys

    from faultkit import ENV, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "automix_fast", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def test_a_one_process_mid_epoch_state_is_refused_by_two_ranks_in_one_line(data, tmp_path):
    """Every rank checks the process count before any data work and stops with the same line
    (no rank is left waiting in a collective)."""
    from automix_fast.engine.checkpoint import load_checkpoint, save_checkpoint

    one = cli(train_args(data, tmp_path, "one", "--mix", "vanilla", epochs=1))
    assert one.returncode == 0, one.stderr[-3000:]
    mid = tmp_path / "mid.pt"
    save_checkpoint(mid, {**load_checkpoint(tmp_path / "one" / "last.pt"), "next_epoch": 0, "next_batch": 2})
    two = torchrun(2, ["train", "--resume", str(mid), "--output", str(tmp_path), "--experiment", "two"], timeout=120)
    assert two.returncode != 0
    line = f"error: {mid} was written mid-epoch (epoch 1, batch 2) by 1 process and this run has 2: " \
           "resume it with one process (no torchrun), or resume from an epoch-end checkpoint (checkpoint-NNNN.pt) instead"
    assert (two.stdout + two.stderr).count(line) == 2, two.stdout[-3000:] + two.stderr[-3000:]
    assert not (tmp_path / "two").exists()


def test_distributed_single_process_noops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_distributed, info.is_main) == (0, 1, False, True)
    assert info.device == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    distributed.barrier()
    distributed.cleanup()
    assert not distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.init_distributed("cpu")
