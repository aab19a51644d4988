"""No host syncs inside a training step: counted at the dispatcher on CPU, per mixing policy.

On CUDA these ops make the host wait for the device: reading a scalar (`.item()`, `int()`,
`float()`, `bool()` -> aten._local_scalar_dense), data-dependent shapes (nonzero,
masked_select, boolean-mask indexing, unique), and copies to the host (`.tolist()`, `.cpu()`,
`.numpy()`, which on CPU tensors never reach the dispatcher, so they are counted at the
Python method). The step runs on CPU with a fused SGD, as the engine's CUDA path does; a
non-log step must make none, a log step at most the two reads the loop is built around
(the interval's metrics in one `.tolist()`, the bad-step counter in one `.item()`).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automix_fast.engine.schedule import ConstSchedule
from automix_fast.engine.train import StepGuard, train_one_epoch
from automix_fast.mixing import build_mixer
from automix_fast.models import create_model

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default}
HOST_METHODS = ("tolist", "cpu", "numpy")


class SyncCounter(TorchDispatchMode):
    """Counts, by name, the ops that would wait on a CUDA device while `active`."""

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


class CountingLoader:
    """Three fixed batches; marks in `counter.seen` where each step begins, and pauses counting
    while it makes a batch (the data pipeline is not the step)."""

    def __init__(self, counter: SyncCounter, n_batches: int = 3):
        g = torch.Generator().manual_seed(0)
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


@pytest.fixture
def count_host_methods(monkeypatch):
    counter_box = {}

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **k):
            c = counter_box.get("counter")
            if c is not None and c.active:
                c.seen.append(f".{name}()")
            return original(self, *a, **k)
        return counted

    for name in HOST_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))
    return counter_box


@pytest.mark.parametrize("policy", ["vanilla", "mixup", "cutmix", "automix"])
def test_no_host_sync_in_a_step_but_the_log_reads(policy, count_host_methods):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=policy == "automix")
    mixer = build_mixer(policy, model, seed=1, kernel_backend="torch")
    params = [p for g in mixer.param_groups(lr=0.1, weight_decay=1e-4) for p in g["params"]]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # skips on the device, as on CUDA
    guard = StepGuard(torch.device("cpu"))
    counter = SyncCounter()
    count_host_methods["counter"] = counter
    loader = CountingLoader(counter)
    with counter:
        result = train_one_epoch(mixer, loader, optimizer, ConstSchedule(0.1), epoch=0, start_step=0,
                                 total_steps=100, amp_dtype=None, guard=guard, log_interval=3)
    counter.active = False
    assert result.steps == 3
    bounds = loader.marks + [len(counter.seen)]
    per_step = [counter.seen[a:b] for a, b in zip(bounds, bounds[1:])]
    assert per_step[0] == [] and per_step[1] == [], f"{policy}: syncs in non-log steps: {per_step[:2]}"
    assert sorted(per_step[2]) == sorted([".tolist()", "_local_scalar_dense"]), f"{policy}: log step: {per_step[2]}"


def test_the_counter_sees_what_would_sync(count_host_methods):
    counter = SyncCounter()
    count_host_methods["counter"] = counter
    t = torch.arange(6.0)
    with counter:
        t.sum().item()
        t[t > 2]
        torch.nonzero(t)
        t.tolist()
        t + 1  # not a sync
    assert counter.seen == ["_local_scalar_dense", "boolean-mask index", "nonzero", ".tolist()"]
