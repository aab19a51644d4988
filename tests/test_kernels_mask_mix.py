"""Parity of the Triton mask upsample + blend with the torch reference: x_mix, s_mean, d logits.

Runs compiled on CUDA, or under TRITON_INTERPRET=1 on CPU (set by conftest.py). Kernel-filled
buffers are NaN-poisoned, so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch

from automix_fast import ops
from automix_fast.kernels import common
from tolerances import assert_bitwise_equal, assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _inputs(N, C, h, w, H, W, dtype, device, channels_last, logits_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    logits = (2 * torch.randn(N, 1, h, w, generator=gen)).to(device=device, dtype=logits_dtype).requires_grad_(True)
    perm = torch.randperm(N, generator=gen).to(device)
    g = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dtype)
    if channels_last:  # the gradient of x_mix has x_mix's layout in training
        g = g.contiguous(memory_format=torch.channels_last)
    gs = torch.randn(N, generator=gen).to(device)
    return logits, x, perm, g, gs


def _loss(x_mix, s_mean, g, gs, use_g=True, use_gs=True):
    loss = 0
    if use_g:
        loss = loss + (x_mix.float() * g.float()).sum()
    if use_gs:
        loss = loss + (s_mean * gs).sum()
    return loss


def _check(N, C, h, w, H, W, mode, dtype, device, channels_last, logits_dtype=torch.float32,
           use_g=True, use_gs=True, x=None, perm=None):
    logits, x0, perm0, g, gs = _inputs(N, C, h, w, H, W, dtype, device, channels_last, logits_dtype)
    x = x0 if x is None else x
    perm = perm0 if perm is None else perm
    tag = f"N={N} C={C} {h}x{w}->{H}x{W} {mode} {dtype} channels_last={channels_last}"
    x_mix, s_mean = ops.mask_mix(logits, x, perm, mode=mode, backend="triton")
    ref_mix, ref_mean = ops.reference.mask_mix(logits, x, perm, mode)
    assert x_mix.dtype == x.dtype and x_mix.shape == x.shape
    assert x_mix.stride() == ref_mix.stride(), f"x_mix strides {x_mix.stride()} != reference {ref_mix.stride()} [{tag}]"
    assert s_mean.dtype == torch.float32 and s_mean.shape == (N,)
    assert_close(x_mix, ref_mix, dtype, f"x_mix [{tag}]")
    assert_close(s_mean, ref_mean, torch.float32, f"s_mean [{tag}]")

    (dl,) = torch.autograd.grad(_loss(x_mix, s_mean, g, gs, use_g, use_gs), logits)
    (ref_dl,) = torch.autograd.grad(_loss(ref_mix, ref_mean, g, gs, use_g, use_gs), logits)
    assert dl.dtype == logits.dtype and dl.shape == logits.shape
    # The gradient math is fp32 in both (x is upcast); only the logits' dtype rounds it.
    assert_close(dl, ref_dl, logits_dtype, f"d logits [{tag} g={use_g} gs={use_gs}]",
                 scale=float(ref_dl.abs().max()))


# (N, C, h, w, H, W): H not divisible by h (cells of unequal size), 8x8 -> 32x32 CIFAR-like,
# non-square, downsampling (cells with no pixel), one pixel a cell.
SIZES = [(2, 3, 8, 8, 30, 30), (2, 3, 7, 7, 32, 32), (3, 3, 4, 4, 17, 23), (1, 3, 8, 8, 32, 32), (2, 3, 9, 9, 5, 7),
         (2, 3, 6, 5, 6, 5)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "{}x{}-to-{}x{}".format(*s[2:]))
def test_parity_fp32(size, mode, channels_last, device):
    _check(*size, mode, torch.float32, device, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_parity_low_precision_images(dtype, mode, channels_last, device):
    _check(2, 3, 7, 7, 32, 32, mode, DTYPES[dtype], device, channels_last=channels_last)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_parity_bf16_logits(mode, device):
    _check(2, 3, 4, 4, 17, 23, mode, torch.bfloat16, device, channels_last=True, logits_dtype=torch.bfloat16)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("use_g, use_gs", [(True, False), (False, True)], ids=["x_mix-only", "s_mean-only"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_gradient_through_one_output(mode, use_g, use_gs, channels_last, device):
    _check(2, 3, 4, 4, 17, 23, mode, torch.float32, device, channels_last=channels_last, use_g=use_g, use_gs=use_gs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_many_channels_and_wide_logits(mode, channels_last, device):
    # C = 5 crosses the 4-channel chunk; w = 70 spans two 64-column blocks of logits (128 in
    # nearest, ~2 pixels a cell); in channels-last a row is 750 elements, several 256-element
    # chunks of the backward.
    _check(1, 5, 3, 70, 9, 150, mode, torch.float32, device, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_rows_wider_than_a_forward_chunk(mode, channels_last, device):
    # The forward walks a row in 256-element chunks: W = 300 is two pixel chunks (the second
    # partly masked), channels-last with C = 4 five element chunks; 21 image rows over 4 logit
    # rows give a logit row 5 or 6 image rows (nearest; bilinear 3 to 8), odd counts for 2-row steps.
    _check(2, 4, 4, 9, 21, 300, mode, torch.float32, device, channels_last=channels_last)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("x_channels_last", [True, False], ids=["x-nhwc-g-nchw", "x-nchw-g-nhwc"])
def test_image_and_gradient_in_different_layouts(x_channels_last, mode, device):
    # Mixed layouts take the (pixel, channel) backward instead of the flat-element one.
    logits, x, perm, g, gs = _inputs(2, 3, 7, 7, 32, 32, torch.float32, device, channels_last=x_channels_last)
    g = g.contiguous() if x_channels_last else g.contiguous(memory_format=torch.channels_last)
    dl = torch.autograd.grad(_loss(*ops.mask_mix(logits, x, perm, mode=mode, backend="triton"), g, gs), logits)[0]
    ref = torch.autograd.grad(_loss(*ops.reference.mask_mix(logits, x, perm, mode), g, gs), logits)[0]
    assert_close(dl, ref, torch.float32, f"d logits ({mode}, x channels-last {x_channels_last}, g the other layout)",
                 scale=float(ref.abs().max()))


@pytest.mark.parametrize("view", ["rows", "columns-nhwc"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_strided_image(mode, view, device):
    # Neither contiguous nor channels_last: a row-subsampled view, or a column-subsampled view of
    # a channels-last batch (pixels 2 C elements apart); x_mix comes back contiguous.
    if view == "rows":
        x = torch.randn(2, 3, 34, 17, device=device)[:, :, ::2, :]
    else:
        x = torch.randn(2, 3, 17, 34, device=device).contiguous(memory_format=torch.channels_last)[..., ::2]
    _check(2, 3, 4, 4, 17, 17, mode, torch.float32, device, channels_last=False, x=x)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_strided_permutation(mode, device):
    """perm as a strided view (every other element of a longer tensor): the kernels read perm[n]."""
    perm = torch.stack([torch.randperm(3), torch.zeros(3, dtype=torch.long)], dim=1).reshape(-1)[::2].to(device)
    assert perm.stride() == (2,)
    _check(3, 3, 4, 4, 16, 16, mode, torch.float32, device, channels_last=True, perm=perm)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_backward_is_deterministic(mode, device):
    logits, x, perm, g, gs = _inputs(3, 3, 7, 7, 32, 32, torch.bfloat16, device, channels_last=True)
    runs = []
    for _ in range(2):
        x_mix, s_mean = ops.mask_mix(logits, x, perm, mode=mode, backend="triton")
        runs.append((x_mix, s_mean, *torch.autograd.grad(_loss(x_mix, s_mean, g, gs), logits)))
    for name, a, b in zip(("x_mix", "s_mean", "d logits"), *runs):
        assert_bitwise_equal(a, b, name)


def test_auto_backend_picks_triton(device):
    assert ops.resolve_backend("auto", device) == "triton"


@pytest.mark.parametrize("case, arg", [
    (lambda lg, x, p: (lg[:, :, None], x, p), "logits"),
    (lambda lg, x, p: (lg, x[0], p), "x"),
    (lambda lg, x, p: (lg, x, p.int()), "perm"),
    (lambda lg, x, p: (lg, x, p[:1]), "perm"),
    (lambda lg, x, p: (lg, x.long(), p), "x"),
])
def test_bad_arguments_raise(case, arg, device):
    logits, x, perm, _, _ = _inputs(2, 3, 4, 4, 8, 8, torch.float32, device, channels_last=False)
    with pytest.raises(ValueError, match=arg):
        ops.mask_mix(*case(logits.detach(), x, perm), backend="triton")
    with pytest.raises(ValueError, match="mode"):
        ops.mask_mix(logits, x, perm, mode="bicubic", backend="triton")



def test_a_checked_signature_still_rejects_bad_arguments(device):
    # The first call caches its signature (shapes, dtypes, devices, mode, backend); calls that
    # differ from it in one argument must still fail the check that names that argument.
    logits, x, perm, _, _ = _inputs(2, 3, 4, 4, 8, 8, torch.float32, device, channels_last=False)
    first = ops.mask_mix(logits, x, perm, backend="triton")
    again = ops.mask_mix(logits, x, perm, backend="triton")
    for name, a, b in zip(("x_mix", "s_mean"), first, again):
        assert_bitwise_equal(a, b, name)
    for kwargs, arg in [(dict(perm=perm.int()), "perm"), (dict(perm=perm.tolist()), "perm"),
                        (dict(perm=perm.to("meta")), "perm is on meta"), (dict(x=x.long()), "x"),
                        (dict(logits=logits.detach()[:, :, None]), "logits"), (dict(mode="bicubic"), "mode"),
                        (dict(backend="cuda"), "backend")]:
        args = dict(logits=logits, x=x, perm=perm, mode="nearest", backend="triton") | kwargs
        with pytest.raises(ValueError, match=arg):
            ops.mask_mix(args.pop("logits"), args.pop("x"), args.pop("perm"), **args)


def test_one_shape_in_two_layouts_gets_a_plan_each(device):
    # The launchers cache tile sizes, grid and strides per signature: the same shape in another
    # memory format is another signature, and x_mix keeps each input's layout.
    for channels_last in (False, True, False):
        _check(2, 3, 7, 7, 32, 32, "bilinear", torch.float32, device, channels_last=channels_last)


def test_without_autograd_the_kernel_runs_directly_with_the_same_numbers(device):
    logits, x, perm, _, _ = _inputs(2, 3, 7, 7, 32, 32, torch.bfloat16, device, channels_last=True)
    want = ops.mask_mix(logits, x, perm, backend="triton")
    assert all(t.grad_fn is not None for t in want)
    with torch.no_grad():
        got = ops.mask_mix(logits, x, perm, backend="triton")
    detached = ops.mask_mix(logits.detach(), x, perm, backend="triton")
    for outs in (got, detached):
        assert all(t.grad_fn is None and not t.requires_grad for t in outs)
        for name, a, b in zip(("x_mix", "s_mean"), outs, want):
            assert a.stride() == b.stride()
            assert_bitwise_equal(a, b.detach(), name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_image_requiring_grad_alone_records_no_autograd(compiled, device):
    """x is data and gets no gradient: with only x requiring grad the outputs do not require grad,
    as the reference's do not, and hold the reference's values (eager, and torch.compile through
    the custom op)."""
    logits, x, perm, _, _ = _inputs(2, 3, 7, 7, 32, 32, torch.float32, device, channels_last=True)
    logits, x = logits.detach(), x.requires_grad_(True)

    def step(logits, x, perm):
        return ops.mask_mix(logits, x, perm, mode="bilinear", backend="triton")

    run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
    got = run(logits, x, perm)
    want = ops.reference.mask_mix(logits, x, perm, "bilinear")
    for name, a, b, dtype in zip(("x_mix", "s_mean"), got, want, (x.dtype, torch.float32)):
        assert not b.requires_grad and not a.requires_grad, f"{name} requires grad"
        assert_close(a, b, dtype, name)


# Compiled-GPU parity at the benchmark presets: bf16 channels-last images, C = 3.
PRESETS = {"cifar-r18": (100, 3, 8, 8, 32, 32), "imagenet-r18": (256, 3, 14, 14, 224, 224),
           "imagenet-r50": (256, 3, 14, 14, 224, 224)}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("preset", ["cifar-r18", "imagenet-r18"])
def test_parity_presets_gpu(preset, mode, device):
    _check(*PRESETS[preset], mode, torch.bfloat16, device, channels_last=True)
    _check(*PRESETS[preset], mode, torch.float32, device, channels_last=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_parity_odd_sizes_gpu(mode, device):
    _check(16, 3, 7, 7, 225, 223, mode, torch.bfloat16, device, channels_last=True)
    _check(4, 3, 13, 11, 1000, 700, mode, torch.float16, device, channels_last=False)
    _check(4, 3, 100, 90, 300, 1400, mode, torch.float32, device, channels_last=True)
