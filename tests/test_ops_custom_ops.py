"""The Triton ops as torch custom ops: torch.compile(fullgraph=True) traces the Mix Block ops and
the whole AutoMix step after its host-side draws, and computes what eager computes.

The "aot_eager" backend runs the traced forward and backward graphs with eager kernels (no C++
compile), so these run in seconds on CPU under TRITON_INTERPRET=1 (set by conftest.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from automix_fast import ops
from automix_fast.mixing import build_mixer
from automix_fast.mixing.automix import BACKBONE_STREAM
from automix_fast.models import create_model
from tolerances import assert_bitwise_equal, assert_close

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compile_recording(fn, graphs: list):
    """torch.compile(fn, fullgraph=True, backend="aot_eager") that appends each FX graph dynamo
    compiles to `graphs`; with fn None, that backend."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend if fn is None else torch.compile(fn, fullgraph=True, backend=backend)


def op_names(graphs) -> str:
    return " ".join(str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function")


# ---------------------------------------------------------------- each op, compiled vs eager


def _attention_inputs(dtype, device, N=2, L=20, D=24):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(N, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(N, L, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return q, k, v, torch.randn(N, L, generator=g).to(device)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mixblock_attention_compiles_to_the_custom_op(dtype, device):
    q, k, v, g = _attention_inputs(dtype, device)

    def step(q, k, v):
        return ops.mixblock_attention(q, k, v, backend="triton")

    graphs = []
    compiled = compile_recording(step, graphs)
    got, want = compiled(q, k, v), step(q, k, v)
    assert "automix_fast.mixblock_attention_fwd" in op_names(graphs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_bitwise_equal(got, want, "out")
    grads_got = torch.autograd.grad((got * g).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_got, grads_want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("needs_grad", ["q", "k", "v", "qk", "qv", "kv", "qkv", ""], ids=lambda s: s or "none")
def test_compiled_attention_matches_the_reference_whichever_inputs_need_grad(needs_grad, device):
    """Compiled attention with any subset of q, k, v requiring grad: the backward op is asked for
    dq alone, dk and dv alone, or both, and gives the reference's forward and gradients."""
    q, k, v, g = (t.detach() for t in _attention_inputs(torch.float32, device))
    inputs = [t.requires_grad_(name in needs_grad) for name, t in zip("qkv", (q, k, v))]
    compiled = compile_recording(lambda q, k, v: ops.mixblock_attention(q, k, v, backend="triton"), [])
    got = compiled(*inputs)
    want = ops.reference.mixblock_attention(*inputs)
    assert_close(got, want, torch.float32, "out", scale=float(want.detach().abs().max()))
    assert got.requires_grad == bool(needs_grad)
    if not needs_grad:
        return
    wrt = [t for t in inputs if t.requires_grad]
    for name, a, b in zip(needs_grad, torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        assert_close(a, b, torch.float32, f"d{name}", scale=float(b.abs().max()))


def _mask_inputs(dtype, device, channels_last, N=3, C=3, h=4, w=5, H=12, W=10):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    logits = (2 * torch.randn(N, 1, h, w, generator=gen)).to(device).requires_grad_()
    perm = torch.randperm(N, generator=gen).to(device)
    g = torch.randn(N, C, H, W, generator=gen).to(device)
    return logits, x, perm, g, torch.randn(N, generator=gen).to(device)


@pytest.mark.parametrize("dtype,channels_last,mode", [
    (torch.float32, False, "nearest"), (torch.float32, True, "bilinear"), (torch.bfloat16, True, "nearest"),
], ids=["fp32-nchw-nearest", "fp32-nhwc-bilinear", "bf16-nhwc-nearest"])
def test_mask_mix_compiles_to_the_custom_op(dtype, channels_last, mode, device):
    logits, x, perm, g, gs = _mask_inputs(dtype, device, channels_last)

    def step(logits, x, perm):
        return ops.mask_mix(logits, x, perm, mode=mode, backend="triton")

    graphs = []
    compiled = compile_recording(step, graphs)
    (got, got_mean), (want, want_mean) = compiled(logits, x, perm), step(logits, x, perm)
    assert "automix_fast.mask_mix_fwd" in op_names(graphs)
    assert got.dtype == dtype and got.stride() == want.stride() == x.stride()  # x's memory format
    assert_bitwise_equal(got, want, "x_mix")
    assert_bitwise_equal(got_mean, want_mean, "s_mean")
    for use_g, use_gs in ((True, True), (False, True), (True, False)):
        def loss(x_mix, s_mean):
            return (x_mix.float() * g).sum() * use_g + (s_mean * gs).sum() * use_gs

        (a,) = torch.autograd.grad(loss(got, got_mean), logits, retain_graph=True)
        (b,) = torch.autograd.grad(loss(want, want_mean), logits, retain_graph=True)
        assert_close(a, b, torch.float32, f"d logits (g={use_g}, gs={use_gs})")


# ---------------------------------------------------------------- first-order only


def _ops_of_one_input(device):
    """(name, f, t): each op as a function of the one tensor its gradient is asked for."""
    q, k, v, _ = _attention_inputs(torch.float32, device)
    logits, x, perm, _, _ = _mask_inputs(torch.float32, device, channels_last=True)
    return [("mixblock_attention", lambda t: ops.mixblock_attention(t, k.detach(), v.detach(), backend="triton"),
             q.detach()),
            ("mask_mix", lambda t: ops.mask_mix(t, x, perm, mode="bilinear", backend="triton")[0].float(),
             logits.detach())]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("loss", ["quadratic", "linear"])
def test_differentiating_a_kernel_gradient_again_raises(loss, compiled, device):
    """The kernels' backwards are first-order only. After create_graph=True (first-order gradient as
    without it), a second backward through that gradient raises instead of leaving its second-order
    term out: also for a loss linear in the output (the incoming gradient does not require grad) and
    when the input also reaches the second loss another way (so the backward has a path without the op)."""
    for name, f, t in _ops_of_one_input(device):
        if compiled:
            f = torch.compile(f, backend="aot_eager", fullgraph=True)
        t = t.requires_grad_(True)

        def first_loss():
            y = f(t)
            return (y * y).sum() if loss == "quadratic" else (0.5 * y).sum()

        # create_graph first: a compiled backward first run without it donates its buffers and
        # then refuses create_graph (torch.compile's rule, not the ops').
        (grad,) = torch.autograd.grad(first_loss(), t, create_graph=True)
        (plain,) = torch.autograd.grad(first_loss(), t)
        assert_bitwise_equal(grad, plain, f"{name}: first-order gradient with create_graph")
        with pytest.raises(RuntimeError, match="first-order only|double backward"):
            torch.autograd.grad(grad.square().sum() + t.sum(), t)


# ---------------------------------------------------------------- torch.library.opcheck


def test_opcheck_each_custom_op(device):
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    from automix_fast.kernels import mask_mix, mixblock_attention  # noqa: F401  (registers the ops)

    custom = torch.ops.automix_fast
    q, k, v, g = _attention_inputs(torch.float32, device, N=2, L=8, D=16)
    out, lse = custom.mixblock_attention_fwd(q, k, v, 0.25)
    opcheck(custom.mixblock_attention_fwd, (q, k, v, 0.25))
    for need_dq, need_dkdv in ((True, True), (False, True), (True, False), (False, False)):
        opcheck(custom.mixblock_attention_bwd, (q.detach(), k.detach(), v.detach(), out.detach(), lse, g, 0.25,
                                                need_dq, need_dkdv))
    logits, x, perm, g, gs = _mask_inputs(torch.float32, device, channels_last=True, N=2, H=8, W=8)
    for mode in ops.MODES:
        opcheck(custom.mask_mix_fwd, (logits, x, perm, mode))
    opcheck(custom.mask_mix_bwd, (logits.detach(), x, perm, "bilinear", g, gs))
    opcheck(custom.mask_mix_bwd, (logits.detach(), x, perm, "nearest", None, gs))


def test_registering_twice_is_harmless():
    import importlib

    from automix_fast.kernels import mask_mix, mixblock_attention

    for module in (mask_mix, mixblock_attention):
        importlib.reload(module)
    assert hasattr(torch.ops.automix_fast, "mask_mix_fwd") and hasattr(torch.ops.automix_fast, "mixblock_attention_bwd")


# ---------------------------------------------------------------- the AutoMix step, compiled vs eager


def _automix(mask_mode):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    return build_mixer("automix", model, seed=1, kernel_backend="auto", mask_mode=mask_mode, mix_block_every=2)


LAM_BB = {0: 0.4, 1: 0.03, 2: 0.95, 4: 0.65}  # steps 1 and 2 within lam_margin = 0.08: plain mixup


@pytest.mark.parametrize("mask_mode,steps", [("nearest", (0, 1, 2, 4)), ("bilinear", (0,))])
def test_automix_step_compiles_whole_and_matches_eager(mask_mode, steps):
    """`loss` through compile_step vs eager, with mix_block_every=2: steps 0, 2, 4 train the Mix
    Block, 1 does not; x_bb is plain mixup on steps 1 and 2. One compile per kind of step and none
    for a new lambda or plain-mixup choice (step 2 reuses step 0's graph, step 4 too)."""
    eager = _automix(mask_mode)
    compiled = copy.deepcopy(eager)
    graphs = []
    compiled.compile_step(backend=compile_recording(None, graphs))
    for mixer in (eager, compiled):
        mixer.train()
        real_beta = mixer.random.beta
        mixer.random.beta = lambda alpha, step, stream, real_beta=real_beta: (
            LAM_BB[step] if stream == BACKBONE_STREAM else real_beta(alpha, step, stream))
    gen = torch.Generator().manual_seed(3)
    for i, step in enumerate(steps):
        x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 5, (6,), generator=gen)
        results = []
        for mixer in (eager, compiled):
            mixer.zero_grad(set_to_none=True)
            loss, logs = mixer.loss(x, y, step, 100)
            loss.backward()
            results.append((loss, logs, {n: p.grad for n, p in mixer.named_parameters() if p.grad is not None}))
        (loss_e, logs_e, grads_e), (loss_c, logs_c, grads_c) = results
        assert_close(loss_c, loss_e, torch.float32, f"loss at step {step}")
        assert logs_c.keys() == logs_e.keys()
        for key in logs_e:
            assert_close(logs_c[key], logs_e[key], torch.float32, f"{key} at step {step}")
        assert grads_c.keys() == grads_e.keys() and any("mix_block" in n for n in grads_e) == (step % 2 == 0)
        for name in grads_e:
            assert_close(grads_c[name], grads_e[name], torch.float32, f"grad {name} at step {step}")
        assert len(graphs) == min(i + 1, 2), f"{len(graphs)} compiles after step {step}"
    names = op_names(graphs)
    assert "automix_fast.mixblock_attention_fwd" in names and "automix_fast.mask_mix_fwd" in names
