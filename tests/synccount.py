"""Count the ops that would make the host wait for a CUDA device, while a real training loop runs on CPU.

Used by tests/test_host_syncs.py, in process and, as a script, under torchrun (2 gloo processes):

    python -m torch.distributed.run --nproc_per_node 2 tests/synccount.py POLICY OUT_DIR [--bad-loss-rank R]

On CUDA these wait: reading a scalar (`.item()`, `int()`, `float()`, `bool()` ->
aten._local_scalar_dense), data-dependent shapes (nonzero, masked_select, boolean-mask
indexing, unique), and copies to the host (`.tolist()`, `.cpu()`, `.numpy()`; on CPU tensors
these never reach the dispatcher, so they are counted at the Python method).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default}
HOST_METHODS = ("tolist", "cpu", "numpy")


class SyncCounter(TorchDispatchMode):
    """Records, by name, the ops that would wait on a CUDA device while `active` (and entered)."""

    def __init__(self):
        super().__init__()
        self.active = True
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            if func in SYNC_OPS:
                self.seen.append(str(func.overloadpacket.__name__))
            elif func.overloadpacket is aten.index and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
                self.seen.append("boolean-mask index")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def host_methods(self):
        """Also count Tensor.tolist/.cpu/.numpy calls (restored on exit)."""
        originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

        def wrap(name):
            original = originals[name]

            def counted(t, *a, **k):
                if self.active:
                    self.seen.append(f".{name}()")
                return original(t, *a, **k)
            return counted

        for name in HOST_METHODS:
            setattr(torch.Tensor, name, wrap(name))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


class CountingLoader:
    """Fixed batches; notes in `marks` where each step begins in `counter.seen`."""

    def __init__(self, counter: SyncCounter, n_batches: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g))
                        for _ in range(n_batches)]
        self.counter = counter
        self.marks: list[int] = []

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for b in self.batches:
            self.marks.append(len(self.counter.seen))
            yield b


def run_steps(policy: str, *, grad_sync=None, metric_mean=None, scaler=None, seed: int = 0, backend: str = "torch"):
    """Three steps of `policy` (log_interval 3: two plain steps, then a log step) with a fused
    SGD, as on CUDA; returns (syncs seen per step, EpochResult, guard, mixer).

    backend="triton" runs the Triton ops' host code (launchers, autograd Functions) with the
    launches recorded instead of run (automix_fast.kernels.launches): what is counted is the host
    side of the GPU path, without the interpreter's own copies to numpy."""
    from automix_fast.engine.schedule import ConstSchedule
    from automix_fast.engine.train import EpochCallbacks, EpochPlan, train_one_epoch
    from automix_fast.engine.train_step import StepContext, StepGuard
    from automix_fast.mixing import build_mixer
    from automix_fast.models import create_model
    from automix_fast.kernels import launches

    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=policy == "automix")
    mixer = build_mixer(policy, model, seed=1, kernel_backend=backend)
    params = [p for g in mixer.param_groups(lr=0.1, weight_decay=1e-4) for p in g["params"]]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # skips on the device, as on CUDA
    guard = StepGuard(torch.device("cpu"))
    counter = SyncCounter()
    loader = CountingLoader(counter, seed=seed)
    recording = launches.recording() if backend == "triton" else contextlib.nullcontext()
    with recording, counter.host_methods(), counter:
        ctx = StepContext(mixer, optimizer, ConstSchedule(0.1), guard, total_steps=100, amp_dtype=None, scaler=scaler,
                          grad_sync=grad_sync, metric_mean=metric_mean)
        result = train_one_epoch(ctx, loader, EpochPlan(epoch=0, start_step=0),
                                 EpochCallbacks(log_interval=3, should_stop=lambda: False))
        counter.active = False
    bounds = loader.marks + [len(counter.seen)]
    return [counter.seen[a:b] for a, b in zip(bounds, bounds[1:])], result, guard, mixer


def _distributed_main(argv: list[str]) -> None:
    """Under torchrun: count per step on every rank; optionally make one rank's loss non-finite
    at step 1 (finite gradients) to check that every rank skips, and counts, that step."""
    import torch.distributed as dist

    from automix_fast.engine import static_step
    from automix_fast.engine.distributed import flat_allreduce_mean

    policy, out_dir = argv[0], Path(argv[1])
    bad_rank = int(argv[3]) if len(argv) > 3 and argv[2] == "--bad-loss-rank" else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scaler = None
    if bad_rank is not None:
        calls = [0]
        real_flag = static_step.nonfinite_flag

        def flag(loss):  # step 1 on bad_rank: a non-finite loss whose gradients are finite
            calls[0] += 1
            f = real_flag(loss)
            return f + 1 if (rank == bad_rank and calls[0] == 2) else f
        static_step.nonfinite_flag = flag  # where the step looks it up
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    per_step, result, guard, mixer = run_steps(policy, grad_sync=flat_allreduce_mean, metric_mean=flat_allreduce_mean,
                                               scaler=scaler, seed=rank)
    state = {k: v.double().sum().item() for k, v in mixer.named_parameters()}  # BN statistics differ per rank
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "per_step": per_step, "skipped": guard.skipped.item(), "steps": result.steps,
        "scale": scaler.get_scale() if scaler is not None else None, "state": state}))
    dist.barrier()  # as the engine does: a rank leaving while the other still talks can abort gloo
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _distributed_main(sys.argv[1:])
