"""What a mixing policy adds to a step beyond its blend, which should be nothing a vanilla step
would not pay for in kind:

- the mixed batch keeps the input's memory format and dtype (a channels-last model fed an NCHW
  batch converts it at the first conv, and a compiled one recompiles for the new strides);
- a compiled model compiles once over mixed (mixup, cutmix, per-sample) and unmixed steps;
- every host-to-device copy the mixing makes goes through `to_device`, which copies to CUDA from
  pinned memory (a copy from pageable memory waits for the device's queue: a host sync per step);
  on a GPU, a mixing step's host code returns while earlier work is still queued.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from automix_fast.mixing import automix, base, baselines, build_mixer
from automix_fast.models import create_model
from mixkit import make_automix

aten = torch.ops.aten
# (policy, settings): every way MixupCutmix mixes a batch, each step mixed
MODES = {
    "mixup": ("mixup", {}),
    "cutmix": ("cutmix", {}),
    "elem": ("mixup", {"mixup": 1.0, "cutmix": 1.0, "mixup_mode": "elem"}),
    "pair": ("mixup", {"mixup": 1.0, "cutmix": 1.0, "mixup_mode": "pair"}),
    "pair-minmax": ("cutmix", {"cutmix_minmax": (0.2, 0.6), "mixup_mode": "pair"}),
}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def model_inputs(mixer, model, x, y, steps):
    """The batches `model` receives over mixer.loss calls at `steps` (the loss is back-propagated)."""
    seen, real = [], model.forward

    def recording(inp, head="one"):
        seen.append(inp)
        return real(inp.float(), head)
    model.forward = recording
    try:
        for step in steps:
            mixer.loss(x, y, step, 100)[0].backward()
    finally:
        model.forward = real
    return seen


def batch(n=9, size=16, dtype=torch.float32, fmt=torch.contiguous_format, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).to(dtype).contiguous(memory_format=fmt)
    return x, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_keeps_the_input_memory_format_and_dtype(mode, fmt, dtype):
    policy, settings = MODES[mode]
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5)
    mixer = build_mixer(policy, model, seed=2, **settings)
    x, y = batch(dtype=dtype, fmt=fmt)
    for step, seen in enumerate(model_inputs(mixer, model, x, y, range(3))):
        assert not torch.equal(seen, x), f"step {step} did not mix"
        assert seen.dtype == x.dtype and seen.stride() == x.stride(), (
            f"{mode} step {step}: x {x.dtype} {x.stride()} became {seen.dtype} {seen.stride()}")


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_automix_backbone_input_keeps_the_input_memory_format(fmt):
    """x_bb, plain mixup or the Mix Block's mix, and x_mb are laid out as x."""
    mixer = make_automix()
    x, _ = batch(n=6, size=32, fmt=fmt)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m = mixer.mix_block(mixer.mix_block_features(x), 0.3, perm)
        mixed = [mixer.mixed_backbone_input(x, m, 0.3, perm, plain) for plain in (True, False)]
        mixed.append(mixer.mix_block.mix(m, x, perm)[0])
    for out in mixed:
        assert not torch.equal(out, x) and out.stride() == x.stride()


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("settings", [{"mixup": 1.0, "cutmix": 1.0, "mix_prob": 0.5},
                                      {"mixup": 1.0, "cutmix": 1.0, "mixup_mode": "elem"},
                                      {"mixup": 1.0, "cutmix": 1.0, "mixup_mode": "pair", "mix_prob": 0.5}],
                         ids=["batch", "elem", "pair"])
def test_a_compiled_model_compiles_once_over_mixed_and_unmixed_steps(settings, fmt):
    """dynamo (backend aot_eager) traces the model once for unmixed, mixup and cutmix batches;
    then a batch in the other memory format is a recompile, which the counters do see."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5).to(memory_format=fmt)
    mixer = build_mixer("mixup", model, seed=2, **settings)
    model.compile(backend="aot_eager")
    x, y = batch(fmt=fmt)
    steps = range(8)
    if mixer.mode == "batch":
        assert {mixer.choose(s) for s in steps} == {None, "mixup", "cutmix"}
    try:
        for step in steps:
            mixer.loss(x, y, step, 100)[0].backward()
        assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1, dict(counters["frames"])
        other = x.contiguous(memory_format=torch.contiguous_format if fmt == torch.channels_last else torch.channels_last)
        mixer.loss(other, y, 0, 100)
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()


class HostToDeviceCopies(TorchDispatchMode):
    """Counts copies from a CPU tensor to another device, inside and outside `to_device`."""

    def __init__(self):
        super().__init__()
        self.depth, self.inside, self.outside = 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default:
            to_host = kwargs.get("device") is None or torch.device(kwargs["device"]).type == "cpu"
            crossing = args[0].device.type == "cpu" and not to_host
        elif func is aten.copy_.default:
            crossing = args[1].device.type == "cpu" and args[0].device.type != "cpu"
        else:
            crossing = False
        if crossing:
            if self.depth:
                self.inside += 1
            else:
                self.outside.append(str(func))
        return func(*args, **kwargs)

    def wrap(self, fn):
        def counted(*a, **k):
            self.depth += 1
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
        return counted


@pytest.fixture
def copies(monkeypatch):
    mode = HostToDeviceCopies()
    for module in (base, baselines, automix):
        monkeypatch.setattr(module, "to_device", mode.wrap(base.to_device))
    return mode


@pytest.mark.parametrize("mode", MODES)
def test_every_host_to_device_copy_of_a_mixing_step_goes_through_to_device(mode, copies):
    """On the meta device (the copies are dispatched, nothing is computed)."""
    policy, settings = MODES[mode]
    model = create_model("tinynet", num_classes=5).to("meta")
    mixer = build_mixer(policy, model, seed=2, **settings)
    x = torch.empty(8, 3, 16, 16, device="meta").contiguous(memory_format=torch.channels_last)
    y = torch.empty(8, dtype=torch.long, device="meta")
    with copies:
        for step in range(3):
            mixer.loss(x, y, step, 100)[0].backward()
    assert copies.outside == [] and copies.inside >= 3


@pytest.mark.parametrize("no_repeat", [False, True])
def test_automix_draws_copy_through_to_device(no_repeat, copies):
    mixer = make_automix(mix_shuffle_no_repeat=no_repeat)
    x = torch.empty(6, 3, 32, 32, device="meta")
    with copies:
        draws = mixer.draws(x, 0, 100)
    assert {draws["perm_bb"].device.type, draws["perm_mb"].device.type} == {"meta"}
    assert copies.outside == [] and copies.inside == 2


def test_to_device_is_the_tensor_itself_on_the_cpu():
    t = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert base.to_device(t, "cpu") is t
    moved = base.to_device(t, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == t.shape and moved.dtype == t.dtype


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_a_mixing_step_does_not_wait_for_the_queued_device_work(mode):
    """With ~0.5 s of work queued on the stream, the step's host code (draws, copies, mix,
    forward, loss) returns before that work has run: no host sync on the way."""
    policy, settings = MODES[mode]
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5).cuda().to(memory_format=torch.channels_last)
    mixer = build_mixer(policy, model, seed=2, **settings)
    x, y = batch(n=64, size=32, fmt=torch.channels_last)
    x, y = x.cuda(), y.cuda()
    mixer.loss(x, y, 0, 100)  # warm-up: cuDNN, the caching allocators
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s at ~2 GHz
    queued = torch.cuda.Event()
    queued.record()
    mixer.loss(x, y, 1, 100)
    still_queued = not queued.query()
    torch.cuda.synchronize()
    assert still_queued, f"{mode}: the host waited for the device during the step"
    on_device = base.to_device(torch.arange(7), "cuda")
    assert on_device.tolist() == list(range(7))
