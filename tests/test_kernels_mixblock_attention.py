"""Parity of the Triton Mix Block attention with the torch reference: forward and dq, dk, dv.

Runs compiled on CUDA, or under TRITON_INTERPRET=1 on CPU (set by conftest.py), where the
sizes stay small. Every kernel-filled buffer is NaN-poisoned first, so an element a kernel
forgets to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from automix_fast import ops
from automix_fast.kernels import common
from tolerances import assert_bitwise_equal, assert_close, assert_close_lowp

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _lowp_reference(q, k, v, scale):
    """The same math computed by PyTorch in the inputs' own dtype (the flash-attention yardstick)."""
    s = torch.bmm(q, k.transpose(1, 2)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, v.unsqueeze(-1)).squeeze(-1)


def _inputs(N, L, LK, D, dtype, device, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, L, D, generator=gen)
    k = torch.randn(N, LK, D, generator=gen)
    v = torch.randn(N, LK, generator=gen)
    g = torch.randn(N, L, generator=gen)
    if strided:
        # q: a transposed view (stride 1 along L); k: every other element of a wider tensor;
        # v: one channel of (N, Lk, 2); g: a column view with a row stride of 3.
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = torch.stack([k, torch.randn(N, LK, D, generator=gen)], dim=-1)[..., 0]
        v = torch.stack([v, torch.randn(N, LK, generator=gen)], dim=-1)[..., 0]
        g = torch.randn(N, L, 3, generator=gen)[..., 1].copy_(g)
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_(True) if not strided else
               _strided_leaf(t, device, dtype) for t in (q, k, v))
    return q, k, v, g.to(device)


def _strided_leaf(t, device, dtype):
    """A leaf tensor with t's values and t's (non-contiguous) strides."""
    leaf = torch.empty_strided(t.size(), t.stride(), device=device, dtype=dtype)
    with torch.no_grad():
        leaf.copy_(t)
    return leaf.requires_grad_(True)


def _check(N, L, LK, D, dtype, device, strided=False, seed=0):
    q, k, v, g = _inputs(N, L, LK, D, dtype, device, strided, seed)
    if strided:
        assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    scale = D ** -0.5
    out = ops.mixblock_attention(q, k, v, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (N, L)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for name, grad, inp in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert grad.dtype == inp.dtype, f"{name} dtype {grad.dtype} != input dtype {inp.dtype}"

    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = ops.reference.mixblock_attention(q32, k32, v32, scale)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g)
    ref = ref.detach()
    tag = f"N={N} L={L} Lk={LK} D={D} {dtype} strided={strided}"
    if dtype == torch.float32:
        assert_close(out, ref, dtype, f"out [{tag}]", scale=float(ref.abs().max()))
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
            assert_close(got, want, dtype, f"{name} [{tag}]", scale=float(want.abs().max()))
        return
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref_lp = _lowp_reference(ql, kl, vl, scale)
    lp_grads = torch.autograd.grad(ref_lp, (ql, kl, vl), g.to(dtype))
    assert_close_lowp(out, ref, ref_lp, dtype, f"out [{tag}]")
    for name, got, want, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, lp_grads):
        assert_close_lowp(got, want, lp, dtype, f"{name} [{tag}]")


# (N, L, Lk, D): Mix Block shapes (L = 7x7, 8x8, 14x14), D not a power of two, D = 130
# crossing the D-chunk boundary (32 for fp32, 64 for fp16/bf16), N = 1, L != Lk.
SMALL = [(2, 49, 49, 24), (2, 64, 64, 40), (1, 64, 64, 130), (3, 49, 64, 40)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "N{}-L{}-Lk{}-D{}".format(*s))
def test_parity(shape, dtype, device):
    _check(*shape, DTYPES[dtype], device)


def test_parity_l196(device):
    _check(2, 196, 196, 40, torch.float32, device)


def test_parity_multi_tile_keys_and_queries(device):
    # L, Lk > 256 take the general path: key blocks looped, one program per (rows, D chunk).
    _check(1, 300, 272, 72, torch.float32, device)


def test_parity_multi_tile_bf16_several_d_chunks(device):
    # fp16/bf16 take 128-column D chunks in the general path: D = 200 is two, the second partial.
    _check(1, 272, 260, 200, torch.bfloat16, device)


@pytest.mark.parametrize("tiling", ["one-tile", "tiled"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_each_backward_tiling_gives_the_reference_gradients(tiling, dtype, device, monkeypatch):
    """attention_backward's tilings (what bench_ops.py's triton-tiled compares): one tile of keys
    (of queries for dk, dv), or blocks of them looped at one D chunk (D = 128 in bf16) or at
    several (fp32), against the torch reference's gradients."""
    from functools import partial

    from automix_fast.kernels import launches, mixblock_attention as mba

    monkeypatch.setattr(mba, "attention_backward", partial(mba.attention_backward, tiling=tiling))
    _check(2, 64, 49, 128, DTYPES[dtype], device, seed=3)
    q, k, v, g = _inputs(2, 64, 49, 128, DTYPES[dtype], device)
    out = ops.mixblock_attention(q, k, v, backend="triton")
    with launches.recording() as recorded:
        torch.autograd.grad(out, (q, k, v), g)
    assert {r.name: r.kwargs["ONE_TILE"] for r in recorded} == {"_bwd_dq": tiling == "one-tile",
                                                                "_bwd_dkdv": tiling == "one-tile"}


def test_a_backward_tiling_that_cannot_fit_is_refused(device):
    from automix_fast.kernels import mixblock_attention as mba

    q, k, v, g = _inputs(1, 300, 300, 16, torch.float32, device)
    out, lse = mba.attention_forward(q.detach(), k.detach(), v.detach(), 0.25)
    with pytest.raises(ValueError, match="tiling 'one-tile' needs at most 256 positions, got 300"):
        mba.attention_backward(q.detach(), k.detach(), v.detach(), out, lse, g, 0.25, tiling="one-tile")
    with pytest.raises(ValueError, match="tiling must be one of auto, one-tile, tiled, got 'fast'"):
        mba.attention_backward(q.detach(), k.detach(), v.detach(), out, lse, g, 0.25, tiling="fast")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_parity_strided(dtype, device):
    _check(2, 49, 49, 40, DTYPES[dtype], device, strided=True)


def test_backward_is_deterministic(device):
    q, k, v, g = _inputs(2, 196, 196, 72, torch.bfloat16, device)
    runs = []
    for _ in range(2):
        out = ops.mixblock_attention(q, k, v, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert_bitwise_equal(a, b, name)


def test_only_some_inputs_need_grad(device):
    q, k, v, g = _inputs(2, 49, 49, 24, torch.float32, device)
    k = k.detach()
    out = ops.mixblock_attention(q, k, v, backend="triton")
    dq, dv = torch.autograd.grad(out, (q, v), g)
    q32, v32 = q.detach().requires_grad_(True), v.detach().requires_grad_(True)
    ref = ops.reference.mixblock_attention(q32, k, v32)
    rq, rv = torch.autograd.grad(ref, (q32, v32), g)
    assert_close(dq, rq, torch.float32, "dq", scale=float(rq.abs().max()))
    assert_close(dv, rv, torch.float32, "dv", scale=float(rv.abs().max()))


def test_auto_backend_picks_triton(device):
    assert ops.resolve_backend("auto", device) == "triton"


@pytest.mark.parametrize("case, arg", [
    (lambda q, k, v: (q[0], k, v), "q"),
    (lambda q, k, v: (q, k[:, :, :-1], v), "k"),
    (lambda q, k, v: (q, k, v[:, :-1]), "v"),
    (lambda q, k, v: (q, k, v.long()), "v"),
    (lambda q, k, v: (q.half(), k, v), "share a dtype"),
])
def test_bad_arguments_raise(case, arg, device):
    q, k, v, _ = _inputs(2, 16, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match=arg):
        ops.mixblock_attention(*case(q.detach(), k.detach(), v.detach()), backend="triton")
    with pytest.raises(ValueError, match="scale"):
        ops.mixblock_attention(q, k, v, scale=-1.0, backend="triton")



def test_a_checked_signature_still_rejects_bad_arguments(device):
    # The first call caches its signature (shapes, dtypes, devices, backend); calls that differ
    # from it in one argument, or pass a bad scale, must still fail the check that names it.
    q, k, v, _ = _inputs(2, 16, 16, 16, torch.float32, device)
    assert_bitwise_equal(ops.mixblock_attention(q, k, v, backend="triton"),
                         ops.mixblock_attention(q, k, v, backend="triton"), "out")
    for args, kwargs, arg in [((q, k, v), dict(scale=-1.0), "scale"), ((q, k, v), dict(scale="0.5"), "scale"),
                              ((q, k, v.detach().half()), {}, "share a dtype"), ((q, k, v[:, :-1]), {}, "v"),
                              ((q, k.detach().to("meta"), v), {}, "k is on meta"), ((q, k, v.tolist()), {}, "v"),
                              ((q, k, v), dict(backend="cuda"), "backend")]:
        with pytest.raises(ValueError, match=arg):
            ops.mixblock_attention(*args, **{"backend": "triton", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors reach the Triton kernels only interpreted")
def test_a_checked_cpu_signature_still_follows_triton_interpret(monkeypatch, device):
    q, k, v, _ = _inputs(2, 16, 16, 16, torch.float32, device)
    ops.mixblock_attention(q, k, v, backend="triton")
    ops.mixblock_attention(q, k, v)  # auto: the Triton kernel while TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.mixblock_attention(q, k, v, backend="triton")
    monkeypatch.setattr(ops.reference, "mixblock_attention", lambda *args: "the torch reference")
    assert ops.mixblock_attention(q, k, v) == "the torch reference"  # auto


@pytest.mark.parametrize("value, on", [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("y", True), ("ON", True),
    ("0", False), ("", False), ("false", False), ("off", False), ("no", False), ("2", False), (" 1", False),
    ("1 ", False), ("t", False),
])
def test_triton_interpret_reads_the_variable_as_triton_does(value, on, monkeypatch):
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert knobs.runtime.interpret is on  # triton's own reading of the value
    assert ops.triton_interpret() is on
    assert ops.resolve_backend("auto", torch.device("cpu")) == ("triton" if on else "torch")


def test_without_autograd_the_kernel_runs_directly_with_the_same_numbers(device):
    q, k, v, _ = _inputs(2, 49, 49, 40, torch.bfloat16, device)
    want = ops.mixblock_attention(q, k, v, backend="triton")
    assert want.grad_fn is not None
    with torch.no_grad():
        got = ops.mixblock_attention(q, k, v, backend="triton")
    detached = ops.mixblock_attention(q.detach(), k.detach(), v.detach(), backend="triton")
    for out in (got, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert_bitwise_equal(out, want.detach(), "out")


# Compiled-GPU parity at the benchmark presets (bf16, as the Mix Block runs under autocast).
PRESETS = {"cifar-r18": (100, 64, 64, 128), "imagenet-r18": (256, 196, 196, 128), "imagenet-r50": (256, 196, 196, 512)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_parity_presets_gpu(preset, dtype, device):
    _check(*PRESETS[preset], DTYPES[dtype], device)


@pytest.mark.gpu
def test_parity_large_general_path_gpu(device):
    _check(8, 784, 784, 1024, torch.bfloat16, device)
    _check(8, 784, 784, 96, torch.float32, device, strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar-r18", "imagenet-r18"])
def test_parity_tiled_backward_at_the_presets_gpu(preset, device, monkeypatch):
    """The compiled tiled backward (bench_ops.py's triton-tiled) at the D = 128 presets, in bf16."""
    from functools import partial

    from automix_fast.kernels import mixblock_attention as mba

    monkeypatch.setattr(mba, "attention_backward", partial(mba.attention_backward, tiling="tiled"))
    _check(*PRESETS[preset], torch.bfloat16, device)
