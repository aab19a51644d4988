"""Helpers for the end-to-end engine tests (test_engine_distributed, test_faults, test_bad_input).

Tiny runs only: a generated 3-class ImageFolder of 32 px PNGs, `tinynet`, the torch loader
with no workers, the torch kernel backend (never the Triton interpreter), one CPU thread per
process (several processes on a shared 2-core machine otherwise spin-wait in OpenMP).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automix_fast.engine.checkpoint import load_checkpoint

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
ENV.pop("TRITON_INTERPRET", None)  # every run passes --kernel-backend torch


def steps_text(n: int) -> str:
    """How an epoch's end line counts steps: `1 step`, `2 steps`."""
    return f"{n} step{'s' if n != 1 else ''}"


def make_folder(root: Path, train_per_class: int = 20, val_per_class: int = 7, classes: int = 3) -> Path:
    """An ImageFolder (train/, val/) of distinguishable 32x32 PNGs: class c is brighter in channel c % 3."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((32, 32, 3)) * 90).astype(np.uint8)
                a[..., c % 3] += 120 + 10 * (c // 3)
                Image.fromarray(a).save(d / f"{i:03d}.png")
    return root


def train_args(data: Path, out: Path, experiment: str, *extra: str, batch: int = 8, epochs: int = 2) -> list[str]:
    mix = extra[extra.index("--mix") + 1] if "--mix" in extra else "automix"
    # The baselines run no kernel: --kernel-backend would be an idle flag, warned about on stderr.
    backend = ["--kernel-backend", "torch"] if mix == "automix" else []
    return ["train", "--data-dir", str(data), "--img-size", "32", "--epochs", str(epochs), "-b", str(batch),
            *backend, "--loader", "torch", "--workers", "0", "--device", "cpu",
            "--model", "tinynet", "--output", str(out), "--experiment", experiment, "--log-interval", "1",
            "--no-visualize", *extra]


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    """`automix-fast ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "automix_fast", *args], env={**ENV, **kw.pop("env", {})},
                          capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "automix_fast", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def run_until(proc: subprocess.Popen, marker: str, timeout: float = 90.0) -> str:
    """Read the process's output until a line contains marker; returns what was read."""
    seen, t0 = [], time.monotonic()
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() - t0 < timeout, "training made no progress"
    raise AssertionError(f"process ended before {marker!r}:\n" + "".join(seen)[-3000:])


@pytest.fixture
def one_thread():
    """One torch CPU thread for runs in the test process (import this fixture into the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What a rank prints when it aborts in gloo's own threads (SIGABRT; rare, not reproducible on demand).
GLOO_ABORT = "terminate called without an active exception"


def torchrun(nproc: int, args: list[str], env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC automix-fast ARGS`. A rank that aborts in gloo's threads
    after the run wrote its summary (rank 0 writes it after the last step's and the evaluation's
    collectives, which every rank took part in) does not fail the run: the exit status is set to
    0; an abort before that, or any other failure, stands."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "automix_fast", *args]
    started = time.time()
    res = subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 and GLOO_ABORT in res.stdout + res.stderr and {"--output", "--experiment"} <= set(args):
        folder = Path(args[args.index("--output") + 1]) / args[args.index("--experiment") + 1]
        summary = folder / "summary.json"
        if summary.exists() and summary.stat().st_mtime >= started:
            res.returncode = 0
    return res


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def train_losses(run_dir: Path) -> list[float]:
    return [r["values"]["loss"] for r in records(run_dir)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["mixer"]


def assert_states_equal(a: dict, b: dict, atol: float = 0.0, keys=None) -> None:
    assert set(a) == set(b)
    for k in keys or a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=atol, msg=lambda m: f"{k}: {m}")


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def fail_writes(monkeypatch, code: int) -> None:
    """Every atomic write (automix_fast.atomic: results, exports, pictures) fails with errno
    `code` after its temp file is created, as a full disk or a read-only file system would."""
    import io

    from automix_fast import atomic

    class Failing(io.FileIO):
        def write(self, data):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic, "open", lambda path, mode="r", *a, **k: Failing(path, "w"), raising=False)


def read_only(monkeypatch, folder: Path) -> None:
    """`folder` reads as not writable to os.access, as on a read-only file system (where chmod
    would not stop root)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path) == Path(folder):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def random_checkpoint(path: Path, arch: str, mix: str, classes: list[str], seed: int = 0, epoch: int = 1,
                      data_root: str | None = None, **config):
    """A training checkpoint of `arch` and `mix` at `path` with random weights and BatchNorm
    statistics (so that encoders and heads differ), its config given `config` besides (e.g.
    data_dir, val_split) and `data_root` as train stores it; returns the policy in eval mode."""
    from automix_fast.config import build_config
    from automix_fast.engine.checkpoint import FORMAT, save_checkpoint
    from automix_fast.engine.policy import create_policy_model, wrap_policy

    cfg = build_config({"model": arch, "mix": mix, "device": "cpu", "kernel_backend": "torch", **config})
    torch.manual_seed(seed)
    mixer = wrap_policy(cfg, create_policy_model(cfg, len(classes)))
    with torch.no_grad():
        for name, t in mixer.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else 0.2 * torch.randn_like(t))
    save_checkpoint(path, {"format": FORMAT, "config": cfg.to_flat(), "model_name": arch,
                           "num_classes": len(classes), "classes": classes, "mixer": mixer.state_dict(), "epoch": epoch,
                           **({"data_root": data_root} if data_root else {})})
    return mixer.eval()
