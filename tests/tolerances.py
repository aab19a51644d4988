"""Numerical tolerances, per dtype, in one place, and comparisons that say where they fail.

Two kinds of check:
- `assert_close(actual, expected, dtype)`: |actual - expected| <= atol + rtol |expected|,
  for results whose only error is the rounding of the output dtype (or fp32 summation order).
- `assert_close_lowp(actual, ref32, ref_lowp, dtype)`: flash-attention style,
  |actual - ref32| <= 2 |ref_lowp - ref32| + atol: a kernel fed fp16/bf16 inputs may be off the
  fp32 reference by at most twice what PyTorch itself is off when it computes in that dtype,
  plus a small floor (`LOWP_ATOL`) for elements where PyTorch happens to be exact.
NaN anywhere in `actual` fails both (outputs are NaN-poisoned before kernels run).
"""
from __future__ import annotations

import torch

# Rounding of the output dtype: fp32 results differ only in summation order and
# 1-ulp transcendental differences; fp16/bf16 outputs by one unit of their last place.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-3, "rtol": 2.0**-10},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2.0**-7},
}

# Floor added to the flash-attention style bound, relative to max |ref32| of the tensor.
LOWP_ATOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _report(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> str:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    b = bound.detach().double().cpu().expand_as(e)
    diff = (a - e).abs()
    bad = ~(diff <= b)  # NaN counts as bad
    n_bad = int(bad.sum())
    excess = torch.where(bad, torch.nan_to_num(diff - b, nan=float("inf")), torch.zeros_like(diff))
    worst = int(excess.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
    return (f"{name}: {n_bad} of {e.numel()} elements out of tolerance; worst at index {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}, |diff| {diff[idx].item():.3g} > "
            f"allowed {b[idx].item():.3g}; max |diff| overall {torch.nan_to_num(diff, nan=float('inf')).max().item():.3g}, "
            f"NaN in actual: {int(torch.isnan(a).sum())}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str, scale: float = 1.0) -> None:
    """Elementwise |actual - expected| <= atol * scale + rtol * |expected|, tolerances of `dtype`."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL[dtype]
    e = expected.detach().double().cpu()
    bound = tol["atol"] * scale + tol["rtol"] * e.abs()
    ok = (actual.detach().double().cpu() - e).abs() <= bound
    assert bool(ok.all()), _report(name, actual, expected, bound)


def assert_close_lowp(actual: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """|actual - ref32| <= 2 |ref_lowp - ref32| + LOWP_ATOL[dtype] * max|ref32| (flash-attention style)."""
    assert actual.shape == ref32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref32.shape)}"
    e = ref32.detach().double().cpu()
    floor = LOWP_ATOL[dtype] * max(float(e.abs().max()), 1e-6)
    bound = 2 * (ref_lowp.detach().double().cpu() - e).abs() + floor
    ok = (actual.detach().double().cpu() - e).abs() <= bound
    assert bool(ok.all()), _report(name, actual, ref32, bound)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Two runs of a deterministic kernel: identical bits (NaN compared as bits too)."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: dtype/shape differ between runs"
    ai = a.detach().contiguous().view(torch.uint8) if a.element_size() == 1 else a.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
    bi = b.detach().contiguous().view(ai.dtype)
    diff = ai != bi
    assert not bool(diff.any()), f"{name}: {int(diff.sum())} elements differ between two identical runs, first at flat index {int(diff.flatten().nonzero()[0])}"


# Resampling in 0..255 levels: a loader's resize against PIL's resize of the same box with the
# same filter (bilinear or bicubic; PIL, torch's F.interpolate with antialias=True and DALI all
# widen the kernel with the downscale, and all three use the bicubic kernel a = -0.5). PIL
# rounds to uint8 and clips between its horizontal and vertical passes where torch (one pass)
# and DALI keep floats, and DALI cuts its antialiasing window differently at strong downscales.
# Measured on datakit.waves, 0.4x to 3.7x: the mean |diff| is at most 0.26 levels (torch, DALI,
# either filter) where the other filter is 2.2 to 3.8 levels off, so the mean bound is what
# tells the filters apart; the max bounds single pixels: DALI's linear 8 levels at 0.42x-0.48x,
# its cubic 5, torch's one pass 4 (its two-pass bicubic in resize_uint8_batch 1).
RESAMPLED_LEVELS = {"mean": 0.5, "max": 8.01}  # .01: levels read back from normalized floats


def assert_resampled_like(actual, expected, name: str) -> None:
    """Two resamplings of one image (arrays in 0..255 levels) agree within RESAMPLED_LEVELS."""
    import numpy as np

    assert np.shape(actual) == np.shape(expected), f"{name}: shape {np.shape(actual)} != {np.shape(expected)}"
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    assert diff.mean() < RESAMPLED_LEVELS["mean"] and diff.max() <= RESAMPLED_LEVELS["max"], (
        f"{name}: mean |diff| {diff.mean():.2f} levels, max {diff.max():.1f} (allowed {RESAMPLED_LEVELS})")
