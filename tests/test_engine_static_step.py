"""The static-buffer step (what --cuda-graph captures) against the eager step, on the CPU: the
same training bit for bit, no host read inside the captured parts, and the same operations on
every step of a kind whatever its per-step values (what makes one graph replayable)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.engine.grad_clip import grad_clipper
from automix_fast.engine.optim import build_optimizer
from automix_fast.engine.policy import compile_policy
from automix_fast.engine.schedule import build_schedule
from automix_fast.engine.static_step import StaticStep
from automix_fast.engine.train import EpochCallbacks, EpochPlan, train_one_epoch
from automix_fast.engine.train_step import StepContext, StepGuard
from automix_fast.errors import UserError
from automix_fast.mixing import build_mixer
from automix_fast.mixing.automix import BACKBONE_STREAM
from automix_fast.models import create_model
from datakit import BatchList
from faultkit import records
from synccount import SyncCounter

TIMING = ("img_per_s_global", "data_share")


def batches(full: int = 7, channels_last: bool = False, small_first: bool = False, device="cpu",
            small: bool = True) -> BatchList:
    """A loader of fixed batches: `full` of 6 images, then one of 5 (a last, smaller batch), or
    the one of 5 first; `small` False: the full batches only."""
    g = torch.Generator().manual_seed(3)
    sizes = [5] * small + [6] * full if small_first else [6] * full + [5] * small
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return BatchList([(torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=fmt).to(device),
                       torch.randint(0, 5, (n,), generator=g).to(device)) for n in sizes])


def train(static: bool, *, policy="automix", epochs=2, accum=1, amp=None, channels_last=False, stepper_cls=StaticStep,
          opt="sgd", small_first=False, small=True, device="cpu", grad_sync=None, compile_scope=None, **mixer_kw):
    """Train tinynet for `epochs` with the eager or the static step (captured on CUDA); (mixer,
    optimizer, logs, stepper). `grad_sync`: the gradients' all-reduce (torchrun's);
    `compile_scope`: torch.compile (aot_eager on the CPU, inductor on CUDA) of that --torchcompile-scope.
    float16 `amp` adds a GradScaler that starts at 2^20 (the first steps overflow) and grows after
    2 good steps, so its scale both backs off (skipped steps) and grows; each log then also holds `scale`. The static
    stepper's `static_at_logs` lists its static_steps at each log."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=policy == "automix").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if policy == "automix":
        mixer_kw = {"kernel_backend": "torch" if device.type == "cpu" else "auto", **mixer_kw}
    mixer = build_mixer(policy, model, seed=1, **mixer_kw).to(device)
    if policy == "vanilla":
        mixer.enable_model_ema(0.9, warmup=True)
    if compile_scope:
        compile_policy(mixer, "aot_eager" if device.type == "cpu" else "inductor", scope=compile_scope)
    groups = mixer.param_groups(0.1, 1e-4, mix_block_lr=0.05)
    optimizer = build_optimizer(groups, opt, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    loader = batches(channels_last=channels_last, small_first=small_first, device=device, small=small)
    steps = -(-len(loader) // accum)
    schedule = build_schedule("cosine", [g["lr"] for g in groups], total_steps=epochs * steps, steps_per_epoch=steps,
                              warmup_steps=2)
    scaler = None
    if amp == torch.float16:
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**20, growth_interval=2)
    ctx = StepContext(mixer, optimizer, schedule, StepGuard(device), epochs * steps, amp_dtype=amp,
                      accum_steps=accum, clip=grad_clipper(5.0, "norm"), grad_sync=grad_sync, scaler=scaler)
    if static:
        ctx.stepper = stepper_cls(ctx) if device.type == "cpu" else stepper_cls(ctx, capture=True)
        ctx.stepper.static_at_logs = []  # static_steps at each log
    logs = []

    def on_log(i, values):
        logs.append({k: x for k, x in values.items() if k not in TIMING})
        if scaler is not None:
            logs[-1]["scale"] = scaler.get_scale()
        if ctx.stepper is not None:
            ctx.stepper.static_at_logs.append(ctx.stepper.static_steps)

    for epoch in range(epochs):
        train_one_epoch(ctx, loader, EpochPlan(epoch=epoch, start_step=epoch * steps),
                        EpochCallbacks(log_interval=2, on_log=on_log))
    return mixer, optimizer, logs, ctx.stepper


def assert_same_training(a, b):
    (mixer_a, opt_a, logs_a, _), (mixer_b, opt_b, logs_b, _) = a, b
    state_a, state_b = mixer_a.state_dict(), mixer_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:  # q, k, the Mix Block, the EMA copy, every BatchNorm statistic
        assert torch.equal(state_a[k], state_b[k]), k
    for p_a, p_b in zip(opt_a.state.values(), opt_b.state.values()):
        for k in p_a:
            assert torch.equal(p_a[k], p_b[k]), k
    assert logs_a == logs_b  # every logged mean, the loss terms and mask statistics included


@pytest.mark.parametrize("mask_mode,accum,amp,channels_last", [
    ("nearest", 2, None, False),
    ("bilinear", 1, torch.bfloat16, True),
])
def test_static_step_trains_automix_as_the_eager_step_bit_for_bit(mask_mode, accum, amp, channels_last):
    """Two epochs with --mix-block-every 2 (both kinds of step), a lam_margin that sends some steps
    to plain mixup and others to the Mix Block's mix, gradient accumulation or bf16 autocast,
    gradient clipping, a warm-up and cosine LR (tensor LRs in the static step), the momentum
    encoder's rising momentum, and a last smaller batch (an eager step amid static ones)."""
    kw = dict(mask_mode=mask_mode, mix_block_every=2, lam_margin=0.3, accum=accum, amp=amp,
              channels_last=channels_last, lam_concat=True)
    eager = train(False, **kw)
    static = train(True, **kw)
    stepper = static[3]
    assert stepper.static_steps >= 4 and set(stepper.grad_params) == {True, False}
    mixer = static[0]
    x = torch.zeros(6, 1)
    plain = {mixer.plain_mixup(mixer.draw(x, s, BACKBONE_STREAM)[0]) for s in range(2, 14)}
    assert plain == {True, False}  # both ways of making x_bb ran through the static buffers
    assert_same_training(eager, static)


def test_static_step_trains_q_batched_automix_as_the_eager_step_bit_for_bit():
    """--q-batched (q's two passes as one) through the static buffers: both kinds of step, both
    lam_margin choices, gradient accumulation, bf16 channels-last."""
    kw = dict(mix_block_every=2, lam_margin=0.3, accum=2, amp=torch.bfloat16, channels_last=True, q_batched=True)
    eager = train(False, **kw)
    static = train(True, **kw)
    assert static[0].q_batched and static[3].static_steps >= 4
    assert_same_training(eager, static)


@pytest.mark.parametrize("accum", [1, 2])
def test_static_step_trains_float16_with_its_loss_scaler_as_the_eager_step_bit_for_bit(accum):
    """float16 autocast with GradScaler: the scale, its growth tracker and the overflow flags live
    on the device, so the static step (and a captured update) equals the eager one through steps
    that overflow, are skipped and back the scale off, and good ones that grow it again: both
    kinds of step, channels-last, with and without gradient accumulation. The first step of each
    kind overflows: fused SGD's momentum must start finite (optim.start_momentum_at_zero)."""
    kw = dict(mix_block_every=2, lam_margin=0.3, accum=accum, amp=torch.float16, channels_last=True)
    eager = train(False, **kw)
    static = train(True, **kw)
    assert static[3].static_steps >= 4 and set(static[3].grad_params) == {True, False}
    statics = static[3].static_at_logs
    assert static[2][0]["skipped_steps"] == 2  # steps 0 and 1: the first of each kind
    momentum = [state["momentum_buffer"] for state in static[1].state.values()]
    assert momentum and all(bool(torch.isfinite(m).all()) for m in momentum)
    scales, skipped = [log["scale"] for log in static[2]], [log["skipped_steps"] for log in static[2]]
    assert any(b < a for a, b in zip(scales, scales[1:])) and any(b > a for a, b in zip(scales, scales[1:]))
    if accum == 1:  # a step skipped in a log window (2 steps) of static steps only
        assert any(statics[i + 1] - statics[i] == 2 and skipped[i + 1] > skipped[i] for i in range(len(statics) - 1))
    assert_same_training(eager, static)


@pytest.mark.parametrize("opt,amp", [("sgd", None), ("adamw", None), ("adamw", torch.float16)])
def test_static_step_trains_vanilla_with_model_ema_as_the_eager_step(opt, amp):
    """Vanilla with model EMA; fused AdamW also under float16's GradScaler (its step count and
    skipped steps on the device)."""
    eager, static = train(False, policy="vanilla", opt=opt, amp=amp), train(True, policy="vanilla", opt=opt, amp=amp)
    if amp is not None:
        assert static[2][0]["skipped_steps"] > 0  # the first step overflowed
    assert_same_training(eager, static)


MIXUP_CUTMIX = dict(policy="mixup", mixup=1.0, cutmix=1.0, mix_prob=0.7)


@pytest.mark.parametrize("kw", [
    dict(accum=2),
    dict(amp=torch.bfloat16, channels_last=True, cutmix_minmax=(0.2, 0.8), model_ema_decay=0.9),
    dict(mixup_mode="elem", amp=torch.bfloat16),
    dict(mixup_mode="pair", model_ema_decay=0.9, model_ema_warmup=True),
], ids=["batch-accum", "batch-minmax-bf16-ema", "elem", "pair-ema"])
def test_static_step_trains_mixup_cutmix_as_the_eager_step_bit_for_bit(kw):
    """timm's mixup/cutmix from the static buffers: in batch mode the three kinds of step (not
    mixed, mixup, cutmix with its box anywhere) each run from the buffers after their first
    step; the elem/pair modes' per-image draws in one kind; with model EMA's weight beside them."""
    kw = {**MIXUP_CUTMIX, **kw}
    eager, static = train(False, **kw), train(True, **kw)
    mixer, stepper = static[0], static[3]
    kinds = {None, "mixup", "cutmix"} if mixer.mode == "batch" else {"per_sample"}
    assert set(stepper.grad_params) == kinds
    steps = -(-len(batches()) // kw.get("accum", 1))
    # Every kind also ran from the buffers: a step of it after its first (eager) one, and not an
    # epoch's last step (whose smaller batch runs eagerly).
    kinds_seen = [mixer.step_kind(s) for s in range(2 * steps)]
    from_buffers = [k for s, k in enumerate(kinds_seen) if k in kinds_seen[:s] and (s + 1) % steps]
    assert set(from_buffers) == kinds and stepper.static_steps >= len(from_buffers)
    assert_same_training(eager, static)


@pytest.fixture
def process_group(request):
    """A one-process group (gloo on the CPU, NCCL on CUDA): torchrun's all-reduce path, in this process."""
    import torch.distributed as dist

    from faultkit import free_port

    backend = getattr(request, "param", "gloo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kw", [dict(mix_block_every=2, lam_margin=0.3), MIXUP_CUTMIX], ids=["automix", "mixup"])
def test_static_step_under_torchrun_all_reduces_as_the_eager_step(kw, process_group):
    """With torchrun's gradient all-reduce (here over a one-process group) the static step trains as
    the eager one bit for bit: every parameter has a gradient on every kind of step (zeros where
    the kind gives none, as the eager step all-reduces them), and the loss flag rides along."""
    from automix_fast.engine.distributed import flat_allreduce_mean

    eager = train(False, grad_sync=flat_allreduce_mean, **kw)
    static = train(True, grad_sync=flat_allreduce_mean, **kw)
    stepper = static[3]
    assert len(stepper.grad_params) >= 2 and stepper.static_steps >= 8
    assert all(len(params) == len(stepper.params) for params in stepper.grad_params.values())
    assert_same_training(eager, static)


@pytest.mark.parametrize("kw", [
    dict(compile_scope="step", mix_block_every=2, lam_margin=0.3, amp=torch.bfloat16),
    dict(compile_scope="step", mix_block_every=2, lam_margin=0.3, q_batched=True),
    dict(compile_scope="encoders", **MIXUP_CUTMIX),
    dict(compile_scope="step", mix_block_every=2, lam_margin=0.3, amp=torch.float16),
], ids=["automix-step-bf16", "automix-step-q-batched", "mixup-encoders", "automix-step-fp16"])
def test_static_step_runs_compiled_code_as_the_eager_compiled_step(kw):
    """--cuda-graph with --torchcompile: the static step runs the compiled encoders, or AutoMix's
    compiled loss step fed the buffers (its plain-mixup choice a tensor, as the eager compiled
    step's), and trains as the eager compiled run bit for bit; the buffers pass the guards of the
    eager run's graphs, so it compiles nothing new (a replayed graph never meets a recompile)."""
    torch._dynamo.reset()
    eager = train(False, **kw)
    counters = torch._dynamo.utils.counters
    counters.clear()
    static = train(True, **kw)
    assert static[3].static_steps >= 10 and counters["stats"].get("unique_graphs", 0) == 0
    assert_same_training(eager, static)


class MicroCountingStep(StaticStep):
    """A StaticStep that lists the micro-batch count of each step it runs from the buffers."""

    def __init__(self, ctx, **kw):
        super().__init__(ctx, **kw)
        self.static_micro = []

    def run(self, step, micro, batches):
        before = self.static_steps
        images = super().run(step, micro, batches)
        if self.static_steps > before:
            self.static_micro.append(micro)
        return images


@pytest.mark.parametrize("kw", [dict(mix_block_every=2, lam_margin=0.3), dict(MIXUP_CUTMIX, amp=torch.float16)],
                         ids=["automix", "mixup-fp16"])
def test_an_epochs_last_step_with_fewer_micro_batches_runs_from_the_buffers_as_the_eager_step(kw):
    """Gradient accumulation over 7 full batches in steps of 2: each epoch's last step has one
    micro-batch, which fits the buffers, so it runs from them with the loss divided by 1 (the
    eager step does not divide), and the training stays equal bit for bit."""
    kw = dict(kw, accum=2, small=False)
    eager, static = train(False, **kw), train(True, stepper_cls=MicroCountingStep, **kw)
    assert {1, 2} <= set(static[3].static_micro)
    assert_same_training(eager, static)


def test_a_smaller_first_batch_does_not_keep_the_static_step_eager():
    """Buffers made for a smaller first batch (a resume at an epoch's last step) follow the next,
    full batch while nothing is captured: the run still steps from the buffers."""
    eager = train(False, small_first=True, mix_block_every=2)
    static = train(True, small_first=True, mix_block_every=2)
    assert static[3].static_steps >= 10 and static[3].buffers["x"].shape[0] == 6
    assert_same_training(eager, static)


def test_capture_note_reports_new_graphs_once():
    """The line the runner prints after an epoch that captured graphs, and nothing after the next."""
    stepper = train(True, epochs=1)[3]
    assert stepper.capture_note() is None  # a CPU captures nothing
    stepper.graphs = {("micro", True): None, ("update", True): None, ("micro", False): None}
    stepper.capture_seconds = {("micro", True): 0.5, ("update", True): 0.25}
    assert stepper.capture_note() == "CUDA graphs: 2 captured (1 kind of step) in 0.8 s; replayed from then on (3 in all)"
    assert stepper.capture_note() is None


class FailingCapture:
    """torch.cuda.graph when a captured op fails: the op's CUDA error invalidates the capture, so
    capture_end (on exit) raises an error of its own."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


def test_a_failed_capture_names_the_failing_op_error_not_capture_ends(monkeypatch):
    """The one-line error of a failed capture gives the captured op's error (what to fix), which
    capture_end's error would hide, and keeps it as the cause (its traceback shows the op); the
    stream current before the capture is current again."""
    mixer = build_mixer("vanilla", create_model("tinynet", num_classes=5), seed=1)
    optimizer = build_optimizer(mixer.param_groups(0.1, 0.0), "sgd", lr=0.1, fused=True)
    stepper = StaticStep(StepContext(mixer, optimizer, None, StepGuard(torch.device("cpu")), 1))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    streams = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "the stream before capture")
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    op_error = RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    def body():
        raise op_error

    with pytest.raises(UserError) as info:
        stepper.capture_graph(("micro", None), body)
    assert str(info.value) == ("--cuda-graph: capturing the micro part of a step failed: CUDA error: operation not "
                               "permitted when stream is capturing; run without --cuda-graph")
    assert info.value.__cause__ is op_error and not stepper.graphs
    assert streams == ["the stream before capture"]  # made current again: torch's exit skipped it


def op_arguments(value):
    """An op argument as a replay must repeat it: a tensor by its shape and dtype (its values may
    change from step to step), anything else (a Python number, a size, a flag) by its value, which
    a CUDA graph bakes in at capture."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), value.dtype
    if isinstance(value, (list, tuple)):
        return tuple(op_arguments(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, op_arguments(v)) for k, v in value.items())
    return value


class OpRecorder(TorchDispatchMode):
    """Records each op with its arguments (see op_arguments); the profiler's own markers left out."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not str(func).startswith("profiler."):  # record_function handles: a new object each run
            self.ops.append((str(func), op_arguments(args), op_arguments(kwargs or {})))
        return out


class RecordingStep(StaticStep):
    """A StaticStep that records, per graph, the ops of each run of its captured parts and the
    host reads among them."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.recorded = {}
        self.syncs = []

    def launch(self, key, body):
        counter, recorder = SyncCounter(), OpRecorder()
        with counter.host_methods(), counter, recorder:
            body()
        self.syncs += counter.seen
        # On a CPU the buffers follow the last, smaller batch too: its runs are compared with their own.
        self.recorded.setdefault((*key, self.buffers["x"].shape[0]), []).append(recorder.ops)


@pytest.mark.parametrize("amp", [None, torch.float16])
def test_captured_parts_read_nothing_on_the_host_and_repeat_the_same_ops(amp):
    """What CUDA graph capture needs, checked on the CPU: no host read inside a captured part, and
    every run of a part replays the same operations on the same shapes with the same non-tensor
    arguments (a Python number that changed between steps would be frozen in a graph) although
    the lambdas (here also as the Mix Block's lam bias), the permutations, the lam_margin choice,
    the LRs and the weights (the annealed mask-loss weight too) change from step to step (and
    under float16, the loss scale, and whether the step overflowed and is skipped)."""
    _, _, logs, stepper = train(True, mix_block_every=2, lam_margin=0.3, stepper_cls=RecordingStep, amp=amp,
                                lam_concat=True, mask_loss_anneal="cosine")
    if amp is not None:
        assert logs[-1]["skipped_steps"] > 0 and len({log["scale"] for log in logs}) > 1
    assert stepper.syncs == []
    full = {key: runs for key, runs in stepper.recorded.items() if key[2] == 6}
    assert set(full) == {("micro", True, 6), ("micro", False, 6), ("update", True, 6), ("update", False, 6)}
    assert all(len(runs) >= 3 for runs in full.values())
    for key, runs in stepper.recorded.items():
        assert all(r == runs[0] for r in runs), f"{key}: the ops differ between steps"


@pytest.mark.parametrize("kw,kinds", [
    (dict(MIXUP_CUTMIX, model_ema_decay=0.9, model_ema_warmup=True), (None, "mixup", "cutmix")),
    (dict(MIXUP_CUTMIX, mixup_mode="pair"), ("per_sample",)),
    (dict(policy="vanilla"), (None,)),
], ids=["batch-ema-warmup", "pair", "vanilla-ema-warmup"])
def test_baselines_replay_the_same_ops(kw, kinds):
    """mixup/cutmix and vanilla on the same check: each kind's runs issue the same operations with
    the same non-tensor arguments although each cutmix step pastes a box of another size in
    another place, the per-image draws change, and the model EMA's warmed-up decay changes every
    step (vanilla trains with it)."""
    _, _, _, stepper = train(True, stepper_cls=RecordingStep, **kw)
    assert stepper.syncs == []
    full = {key for key, runs in stepper.recorded.items() if key[2] == 6 and len(runs) >= 2}
    assert {("micro", k, 6) for k in kinds} <= full
    for key, runs in stepper.recorded.items():
        assert all(r == runs[0] for r in runs), f"{key}: the ops differ between steps"


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_backward_part_by_part_gives_the_gradients_of_one_backward(amp):
    """AutoMix's forward_backward (the Mix Block branch, q's clean pass and q's mixed pass each
    backpropagated before the next is built) against one backward of the summed loss, scaled as
    gradient accumulation and a loss scaler scale it: equal gradients, statistics and logs. Under
    bf16 autocast the reference backward runs with autocast's weight cache off: with it on, one
    backward sums q's two passes' weight gradients in bf16 at the shared cast before converting
    them to float32, where the parts (and a cache-free backward) sum the float32 conversions."""
    from contextlib import nullcontext

    from mixkit import batch, make_automix

    def autocast(cache=True):
        return torch.autocast("cpu", dtype=amp, cache_enabled=cache) if amp is not None else nullcontext()

    a, b = make_automix(mix_block_every=2, lam_margin=0.3), make_automix(mix_block_every=2, lam_margin=0.3)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x, y = batch()
    seen_plain = set()
    for step in range(6):
        seen_plain.add(a.plain_mixup(a.draw(x, step, BACKBONE_STREAM)[0]))
        for m in (a, b):
            m.zero_grad(set_to_none=True)
        with autocast(cache=False):
            loss_a, logs_a = a.loss(x, y, step, 100)
        (loss_a / 3 * 256.0).backward()
        loss_b, logs_b = b.forward_backward(x, y, step, 100, autocast, lambda t: (t / 3 * 256.0).backward())
        assert torch.equal(loss_a.detach(), loss_b)
        assert logs_a.keys() == logs_b.keys() and all(torch.equal(logs_a[k], logs_b[k]) for k in logs_a)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or torch.equal(p.grad, q.grad), name
        for (name, t), u in zip(a.named_buffers(), b.buffers()):
            assert torch.equal(t, u), name
    assert seen_plain == {True, False}


def _cli_run(tmp_path, capsys, name, *extra):
    from automix_fast.cli import main
    from automix_fast.data.embedded import ensure_embedded_dataset

    data = ensure_embedded_dataset(str(tmp_path / "cache"), train_per_class=4, val_per_class=2)
    argv = ["train", "--data-dir", data, "-b", "8", "--model", "tinynet", "--loader", "torch", "-j", "0",
            "--log-interval", "1", "--kernel-backend", "torch", "--output", str(tmp_path), "--experiment", name,
            "--no-visualize", "--mix-block-every", "2", "--lam-margin", "0.3", *extra]
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    values = [{k: v for k, v in r["values"].items() if k not in TIMING} for r in records(tmp_path / name)]
    return out.out, values, load_checkpoint(tmp_path / name / "last.pt")["mixer"]


def test_cuda_graph_flag_on_a_cpu_trains_as_the_eager_run_and_resumes(tmp_path, capsys):
    """`automix-fast train --cuda-graph` on a CPU runs the static-buffer step (and says so). It
    updates with torch's fused SGD, the eager CPU run with the unfused one (their last bits may
    differ; the same optimizer gives equal runs, see the tests above), so the logs agree closely;
    the run resumed from its epoch-1 checkpoint (which holds float LRs) with --cuda-graph ends
    bit for bit where the uninterrupted run ends."""
    _, eager_logs, _ = _cli_run(tmp_path, capsys, "eager", "--epochs", "2")
    out, static_logs, static = _cli_run(tmp_path, capsys, "static", "--epochs", "2", "--cuda-graph")
    assert "static buffers without capture" in out
    assert len(static_logs) == len(eager_logs) == 10
    for a, b in zip(eager_logs, static_logs):
        assert a.keys() == b.keys()
        for k in ("loss", "l_mix_q", "l_one_q", "l_mix_k", "l_mask", "mask_partner_mean"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    epoch_1 = tmp_path / "static" / "checkpoint-0001.pt"
    assert all(isinstance(g["lr"], float) for g in load_checkpoint(epoch_1)["optimizer"]["param_groups"])
    _, resumed_logs, resumed = _cli_run(tmp_path, capsys, "resumed", "--epochs", "2", "--cuda-graph",
                                        "--resume", str(epoch_1))
    assert resumed_logs == static_logs[5:]  # the fork logs its own epoch only
    assert all(torch.equal(static[k], resumed[k]) for k in static)
    # Across the flag: a resumed run uses the optimizer kernel it built (fused with the flag,
    # torch's default without), not the one the checkpoint was saved from.
    for source, name, flags, reference in (("eager", "eager-then-static", ["--cuda-graph"], eager_logs),
                                           ("static", "static-then-eager", [], static_logs)):
        _, logs, _ = _cli_run(tmp_path, capsys, name, "--epochs", "2", *flags, "--resume",
                              str(tmp_path / source / "checkpoint-0001.pt"))
        assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in reference[5:]], rel=1e-4)


def test_q_batched_flag_reaches_the_step_and_is_stored(tmp_path, capsys):
    """`--q-batched` (with --cuda-graph or without) is stored in config.yaml, named in the header
    and reaches the step: q's first loss differs from the two-pass run's from the first step on (BatchNorm's
    statistics span both batches), and the static step logs what the eager one does."""
    import yaml

    out_two, two, _ = _cli_run(tmp_path, capsys, "two", "--epochs", "1")
    out_one, one, _ = _cli_run(tmp_path, capsys, "one", "--epochs", "1", "--q-batched")
    # The header says how the step departs from the official one (here also --mix-block-every).
    every = "--mix-block-every 2 (the Mix Block trains on one step in 2)"
    assert f"not the official AutoMix step: {every}\n" in out_two
    assert (f"not the official AutoMix step: {every}; --q-batched (q's two passes as one: BatchNorm statistics "
            "over both batches)\n") in out_one
    _, graphed, _ = _cli_run(tmp_path, capsys, "graphed", "--epochs", "1", "--q-batched", "--cuda-graph")
    assert yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["q_batched"] is True
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["q_batched"] is False
    assert one[0]["l_one_q"] != pytest.approx(two[0]["l_one_q"], rel=1e-4)
    assert [r["loss"] for r in graphed] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=1e-6)


def test_cuda_graph_flag_runs_mixup_cutmix(tmp_path, capsys):
    """`--mix cutmix --mixup 1 --cutmix 1 --cuda-graph` trains from the static buffers through the CLI."""
    out, logs, _ = _cli_run(tmp_path, capsys, "mixcut", "--mix", "cutmix", "--mixup", "1", "--cutmix", "1",
                            "--cuda-graph")
    assert "static buffers without capture" in out and logs and all(math.isfinite(r["loss"]) for r in logs)


def test_cuda_graph_flag_trains_float16_with_its_loss_scaler_and_resumes(tmp_path, capsys):
    """`--cuda-graph --amp --amp-dtype float16` on a CPU: the static-buffer step with GradScaler
    logs what the eager float16 run logs (closely: fused against unfused SGD, as above), and the
    run resumed from its epoch-1 checkpoint, which holds the scaler's scale, ends bit for bit
    where the uninterrupted run ends."""
    fp16 = ("--amp", "--amp-dtype", "float16")
    _, eager_logs, _ = _cli_run(tmp_path, capsys, "eager", "--epochs", "2", *fp16)
    out, static_logs, static = _cli_run(tmp_path, capsys, "static", "--epochs", "2", "--cuda-graph", *fp16)
    assert "static buffers without capture" in out
    assert len(static_logs) == len(eager_logs) == 10
    for a, b in zip(eager_logs, static_logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["skipped_steps"] == a["skipped_steps"]
    epoch_1 = tmp_path / "static" / "checkpoint-0001.pt"
    # GradScaler's growth tracker counted epoch 1's 5 good steps, updated on the device by the
    # static step; the resumed run must carry it on (10 at the end, as uninterrupted).
    assert static_logs[4]["skipped_steps"] == 0 and load_checkpoint(epoch_1)["scaler"]["_growth_tracker"] == 5
    _, resumed_logs, resumed = _cli_run(tmp_path, capsys, "resumed", "--epochs", "2", "--cuda-graph", *fp16,
                                        "--resume", str(epoch_1))
    assert resumed_logs == static_logs[5:]
    assert all(torch.equal(static[k], resumed[k]) for k in static)
    assert (load_checkpoint(tmp_path / "resumed" / "last.pt")["scaler"]
            == load_checkpoint(tmp_path / "static" / "last.pt")["scaler"])


def test_a_state_without_some_momentum_resumes_into_the_fused_sgd_of_cuda_graph(tmp_path, capsys):
    """A checkpoint whose optimizer state lacks some parameters' momentum (as an unfused run's
    does for parameters with no step yet) resumes into --cuda-graph's fused SGD: those buffers
    start at zero (optim.start_momentum_at_zero; torch's fused SGD refuses a parameter group
    that mixes parameters with and without one)."""
    from automix_fast.engine.checkpoint import save_checkpoint

    _cli_run(tmp_path, capsys, "eager", "--epochs", "2")
    state = load_checkpoint(tmp_path / "eager" / "checkpoint-0001.pt")
    dropped = sorted(state["optimizer"]["state"])[:3]
    for i in dropped:
        del state["optimizer"]["state"][i]
    save_checkpoint(tmp_path / "cut.pt", state)
    _, logs, _ = _cli_run(tmp_path, capsys, "resumed", "--epochs", "2", "--cuda-graph", "--resume",
                          str(tmp_path / "cut.pt"))
    assert len(logs) == 5 and all(math.isfinite(r["loss"]) for r in logs)
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["optimizer"]["state"]
    assert all(torch.isfinite(resumed[i]["momentum_buffer"]).all() for i in dropped)


@pytest.mark.parametrize("flags,says", [
    (["--opt", "apex_sgd"], "--cuda-graph needs --opt sgd or adamw"),
    (["--torchcompile", "--torchcompile-mode", "reduce-overhead"],
     "--cuda-graph does not combine with --torchcompile-mode reduce-overhead"),
    (["--torchcompile", "cudagraphs"], "--cuda-graph does not combine with --torchcompile cudagraphs"),
])
def test_cuda_graph_refuses_what_it_cannot_capture_in_one_line(tmp_path, capsys, flags, says):
    from automix_fast.cli import main

    code = main(["train", "--cuda-graph", "--output", str(tmp_path), "--experiment", "x", *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.gpu
@pytest.mark.parametrize("policy,compile_scope,amp", [("automix", None, None), ("vanilla", None, None),
                                                      ("mixup", None, None), ("automix", "step", None),
                                                      ("mixup", "encoders", None), ("automix", None, torch.float16)])
def test_captured_cuda_graphs_train_as_the_eager_step(policy, compile_scope, amp, deterministic_cudnn):
    """On CUDA: each kind's micro-batch and update captured once and replayed (Triton kernels,
    channels-last, both kinds of step, both plain-mixup choices; inductor's code with
    `compile_scope`; float16 with GradScaler, whose BatchNorm runs cuDNN's kernels) train as the
    eager step does (compiled alike), up to the float32 rounding of the learning rate and the
    GPU's atomics."""
    torch._dynamo.reset()
    kw = dict(policy=policy, device="cuda", channels_last=True, epochs=3, compile_scope=compile_scope, amp=amp)
    if policy == "automix":
        kw.update(mix_block_every=2, lam_margin=0.3)
    if policy == "mixup":
        kw.update(MIXUP_CUTMIX)
    eager, graphed = train(False, **kw), train(True, **kw)
    stepper = graphed[3]
    kinds = {"automix": {True, False}, "vanilla": {None}, "mixup": {None, "mixup", "cutmix"}}[policy]
    assert set(stepper.graphs) == {(part, kind) for part in ("micro", "update") for kind in kinds}
    assert stepper.capture_note().startswith(f"CUDA graphs: {2 * len(kinds)} captured ({len(kinds)} kind")
    assert_close_training(eager, graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("process_group", ["nccl"], indirect=True)
def test_captured_cuda_graphs_all_reduce_as_the_eager_step(process_group, deterministic_cudnn):
    """On CUDA under a (one-process) NCCL group: the gradients' all-reduce is captured with the
    update and the run trains as the eager step does."""
    from automix_fast.engine.distributed import flat_allreduce_mean

    kw = dict(device="cuda", channels_last=True, epochs=3, mix_block_every=2, lam_margin=0.3,
              grad_sync=flat_allreduce_mean)
    eager, graphed = train(False, **kw), train(True, **kw)
    assert {key[0] for key in graphed[3].graphs} == {"micro", "update"}
    assert_close_training(eager, graphed)


def assert_close_training(eager, graphed):
    """The logged values and the final states within the GPU's rounding (float32 LR, atomics)."""
    for a, b in zip(eager[2], graphed[2]):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k
    for (name, a), b in zip(eager[0].state_dict().items(), graphed[0].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
