"""Fused mask upsample + sigmoid + blend of a batch with its permuted partner, in Triton.

Math (per sample n, pixel p = (y, x) of the H x W image, channel c; logits are h x w):

    z[p]       = interpolate(logits[n, 0], (H, W), mode)[p]      nearest | bilinear (align_corners=False)
    s[p]       = sigmoid(z[p])
    x_mix[c,p] = (1 - s[p]) x[n, c, p] + s[p] x[perm[n], c, p]     (fp32, torch.lerp's formula)
    s_mean[n]  = mean_p s[p]

Interpolation follows torch.nn.functional.interpolate with `size=` exactly, separably per axis:
    nearest:  src = min(floor(dst * (in / out)), in - 1), the scale a float32 quotient;
    bilinear: src = max((dst + 0.5) * (in / out) - 0.5, 0); i0 = floor(src);
              i1 = i0 + (i0 < in - 1); lambda1 = src - i0; lambda0 = 1 - lambda1.
so z[y, x] = sum_{a, b} wy[y, a] wx[x, b] logits[a, b] with wy, wx those one- or two-tap weights.

Backward (x is data and gets no gradient), from g = d loss / d x_mix and gs = d loss / d s_mean:

    ds[p]         = sum_c g[c, p] (x[perm[n], c, p] - x[n, c, p]) + gs[n] / (H W)
    dz[p]         = ds[p] s[p] (1 - s[p])
    dlogits[a, b] = sum_y wy[y, a] sum_x wx[x, b] dz[y, x]

In nearest mode wy and wx are one-hot: every pixel of cell (a, b) = {(y, x): y0(y) = a,
x0(x) = b} (y0, x0 the forward's source indices) has z = logits[a, b], hence one s(1 - s), so

    dlogits[a, b] = s_ab (1 - s_ab) (sum_{p in cell(a, b)} sum_c g[c, p] (x[perm[n], c, p] - x[n, c, p])
                                     + |cell(a, b)| gs[n] / (H W)),   s_ab = sigmoid(logits[a, b])

with either term absent when g or gs is. Cells differ in size when H is not a multiple of h
(32 px over 7 cells: 4 or 5 rows) and are empty when H < h.

Design:
- `_fwd`: one program per (chunk of BLOCK_E row elements, logit row a, sample), walking the
  image rows whose source row (i0 in bilinear mode) is a, [y_first, y_end), found exactly as
  in the nearest backward (`_cell_start`), ROWS rows a step (tile sizes: `_fwd_tile`).
  Channels-last x and x_mix (CHANNELS_INNER) are walked by flat element e = x * C + c of a row
  (C a constexpr: e // C is a multiply), one warp holding both rows of its columns; otherwise
  by pixel, one channel plane after another, through x's and x_mix's own strides (a warp a
  row when rows are long). What the rows share is computed once per chunk element before the walk: in nearest
  mode s itself (every pixel of cell (a, x0) has z = logits[a, x0]: one gather and one
  sigmoid per chunk element, not per image element); in bilinear mode the logit rows a and a1
  interpolated along x, z_a = (1 - lx) v[a, x0] + lx v[a, x1], so a row's z is
  (1 - ly) z_a + ly z_a1 (the operations of interpolating each pixel directly, in the same
  order). Per image element the walk then does two loads, the lerp and a store (bilinear:
  also z, its sigmoid and the s_mean term). The partner image is read through perm[n] inside
  the kernel (x[perm] is never built); x_mix is written in x's memory format (channels_last
  stays channels_last, nothing is made contiguous). Chunks start at multiples of BLOCK_E and
  rows at y * stride_h, so where the row stride is a multiple of 16 elements (224 and 32 px
  images) the loads and stores are 16-byte vectors, 8 consecutive elements of a row a lane.
  s_mean: each program writes the sum of s over its pixels (nearest: rows x the chunk's sum)
  to a partial buffer (N, h x chunks), summed afterwards in a fixed order: deterministic, no
  atomics. At ImageNet bf16 channels-last (sm_90): ~2.5 SASS instructions per image byte in
  nearest mode, ~5.9 in bilinear (a sigmoid per image element), 64 / 114 registers, no spills.
- Nearest backward, `_bwd_nearest`: one kernel, no atomics, no buffer, one one-warp program per
  (logit row a, sample) covering the whole image width, so rows are read as contiguous runs
  across cell borders (a program per cell would start its loads at unaligned cell borders) and
  every image element is read once. Its image rows [y_first, y_end) are exact: y0 is monotone,
  so a cell row starts after the rows whose forward index y0 is below a, counted over an 8-row
  window from floor(a * H / h) - 3 (rounding moves the border by far less than a row). It walks
  them in chunks of BLOCK_E row elements, ROWS (2) rows at a time, and accumulates
  g (x[perm] - x) in fp32: the only per-element work (3 loads, 3 converts, a subtract, a
  multiply-add; no sigmoid, no gather of a logit). Channels-last x and g (CHANNELS_INNER) are
  walked by flat element e = x * C + c (C a constexpr: e // C is a multiply); otherwise by
  pixel, one channel plane after another, through x's and g's own strides (they may differ).
  Chunks start at multiples of BLOCK_E and rows at y * stride_h, so where the row stride is a
  multiple of 16 elements (224 and 32 px images) the loads are 16-byte vectors; a lane holds
  both rows of its columns, so their sum needs no shuffle. After a chunk's rows, its column
  sums (plus rows * gs / (H W) once per pixel) are added to the logit columns the forward's
  index x0 gives each pixel, CELLS consecutive columns at a time (a one-hot [CELLS, BLOCK_E]
  sum): pixels go to cells by the exact test, never by rounding arithmetic. Last, each column
  is multiplied by its s (1 - s) once and written. 57-72 registers, no spills, 96-192 bytes in
  flight a lane per iteration; the 14 x 256 one-warp programs of an ImageNet batch are all
  resident at once on an H100 (32 a SM).
- Bilinear backward, two kernels, deterministic, no atomics, and no N x H x W intermediate
  (the weights of a pixel mix four logits, so s varies inside a cell):
  `_bwd_rows` owns (image row y, block of logit columns b, sample). It reads g, x and
  x[perm] once for the row's pixels x that touch its columns, forms dz and contracts it
  with wx right away: t[n, y, b] = sum_x wx[x, b] dz[y, x], an (N, H, w) float32 buffer
  (W / w times smaller than dz). `_bwd_cols` owns (logit row a, block of columns, sample)
  and sums t over the image rows that touch a: dlogits[a, b] = sum_y wy[y, a] t[y, b].
  A program finds its footprint (the pixels touching its cells) from the inverse of the
  index map with a margin of two pixels, then keeps only the pixels whose exact forward
  index (same code as the forward) lands on its cells, so rounding never drops a pixel.
  The footprint is widened to multiples of 16 pixels and masked only by the image width,
  so the compiler can prove the row loads aligned (16-byte vectors); channels-last x and g
  (CHANNELS_INNER) are walked by flat element x * C + c along the row, as in the forward.
- Which specializations the launchers pick, and what they compile to for sm_80 / sm_90, is
  checked in CI without a GPU by bench/aot_compile.py (tests/test_bench_aot_compile.py).
- All indexing and blending is fp32 whatever the image dtype.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from automix_fast.kernels.common import (cdiv, define_op, first_order_only, is_channels_last, layout, needs_autograd,
                                         new_strided, op_registered, pow2, remember)
from automix_fast.kernels.launches import launch

__all__ = ["mask_mix", "mask_mix_forward", "mask_mix_backward"]


@triton.jit
def _src_index(dst, in_size, scale, BILINEAR: tl.constexpr):
    """Source taps of output index `dst` (int32 tensor): (i0, i1, lambda1), as F.interpolate."""
    if BILINEAR:
        src = (dst.to(tl.float32) + 0.5) * scale - 0.5
        src = tl.maximum(src, 0.0)
        i0 = src.to(tl.int32)  # floor: src >= 0
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        lam1 = src - i0.to(tl.float32)
    else:
        i0 = _nearest_src(dst, in_size, scale)
        i1 = i0
        lam1 = tl.zeros(dst.shape, dtype=tl.float32)
    return i0, i1, lam1


@triton.jit
def _nearest_src(dst, in_size, scale):
    """Nearest-mode source index of output index `dst` (int32 scalar or tensor), as F.interpolate."""
    return tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int32), in_size - 1)


@triton.jit
def _cell_start(a, out_size, in_size, scale, inv_scale, BILINEAR: tl.constexpr = False):
    """The first output index whose source index (i0 in bilinear mode) is >= a (out_size when there is none).

    The index map is monotone, so this is the number of indices before the boundary: counted
    with the exact forward index over an 8-index window from the boundary's estimate minus 3
    (nearest: a * inv_scale, bilinear: (a + 0.5) * inv_scale - 0.5), which holds the boundary
    (float rounding moves it by far less than an index). Bilinear i0 clamps to 0 below the
    image, so a = 0 starts at 0 (every index maps to i0 >= 0)."""
    if BILINEAR:
        base = tl.floor((a.to(tl.float32) + 0.5) * inv_scale - 0.5).to(tl.int32) - 3
        k = base + tl.arange(0, 8)
        src, _, _ = _src_index(k, in_size, scale, True)
    else:
        base = tl.floor(a.to(tl.float32) * inv_scale).to(tl.int32) - 3
        k = base + tl.arange(0, 8)
        src = _nearest_src(k, in_size, scale)
    before = (k < out_size) & (src < a)
    start = tl.minimum(base + tl.sum(before.to(tl.int32), axis=0), out_size)
    if BILINEAR:
        start = tl.where(a == 0, 0, start)
    return start


@triton.jit
def _tap_weight(i0, i1, lam1, cell):
    """Bilinear weight of source cell `cell` in an output index with taps (i0, i1, lam1) (broadcasts)."""
    return tl.where(i0 == cell, 1.0 - lam1, 0.0) + tl.where(i1 == cell, lam1, 0.0)


@triton.jit
def _footprint(first, last, out_size, in_size, inv_scale):
    """[lo, hi): a superset of the output indices whose bilinear taps touch source cells first..last."""
    lo_f = (first.to(tl.float32) - 0.5) * inv_scale - 0.5
    hi_f = (last.to(tl.float32) + 1.5) * inv_scale - 0.5
    lo = tl.maximum(tl.floor(lo_f).to(tl.int32) - 2, 0)
    hi = tl.minimum(tl.ceil(hi_f).to(tl.int32) + 2, out_size)
    hi = tl.where(last >= in_size - 1, out_size, hi)
    return lo, hi


@triton.jit
def _bilinear_logit(l_base, slh, slw, yy, xx, mask, h, w, scale_h, scale_w):
    """interpolate(logits, mode="bilinear")[yy, xx] in fp32 (yy, xx broadcastable int32 tensors)."""
    y0, y1, ly = _src_index(yy, h, scale_h, True)
    x0, x1, lx = _src_index(xx, w, scale_w, True)
    v00 = tl.load(l_base + y0 * slh + x0 * slw, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(l_base + y0 * slh + x1 * slw, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(l_base + y1 * slh + x0 * slw, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(l_base + y1 * slh + x1 * slw, mask=mask, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _fwd(LOG, X, PERM, OUT, PART,
         H, W, h, w, scale_h, scale_w, inv_scale_h, n_chunks,
         sln, slh, slw, sxn, sxc, sxh, sxw, son, soc, soh, sow, spn,
         C: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BILINEAR: tl.constexpr,
         CHANNELS_INNER: tl.constexpr):
    pid_e = tl.program_id(0)
    a = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    # The image rows whose source row (i0 in bilinear mode) is logit row a, exactly: [y_first, y_end).
    y_first = _cell_start(a, H, h, scale_h, inv_scale_h, BILINEAR)
    y_end = tl.where(a + 1 < h, _cell_start(a + 1, H, h, scale_h, inv_scale_h, BILINEAR), H)
    # Row geometry (row_len, per_pixel, planes, element strides of x and x_mix): channels-last x
    # and x_mix are walked by flat element e = x * C + c of a row; otherwise by pixel e = x, one
    # channel plane after another, through x's and x_mix's own strides.
    if CHANNELS_INNER:
        row_len, per_pixel, planes, sxe, soe = W * C, C, 1, 1, 1
    else:
        row_len, per_pixel, planes, sxe, soe = W, 1, C, sxw, sow
    ee = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = ee < row_len
    px = ee // per_pixel
    first = mask_e & (ee == px * per_pixel)  # a pixel's first element: counted once in s_mean
    # What every row of the program shares, once per element of the chunk: nearest, s itself
    # (every pixel of cell (a, x0) has z = logits[a, x0]); bilinear, the two logit rows a and a1
    # interpolated along x (each row then mixes them with its own weight ly).
    l_base = LOG + n * sln
    if BILINEAR:
        a1 = a + (a < h - 1).to(tl.int32)
        x0, x1, lx = _src_index(px, w, scale_w, True)
        v00 = tl.load(l_base + a * slh + x0 * slw, mask=mask_e, other=0.0).to(tl.float32)
        v01 = tl.load(l_base + a * slh + x1 * slw, mask=mask_e, other=0.0).to(tl.float32)
        v10 = tl.load(l_base + a1 * slh + x0 * slw, mask=mask_e, other=0.0).to(tl.float32)
        v11 = tl.load(l_base + a1 * slh + x1 * slw, mask=mask_e, other=0.0).to(tl.float32)
        z_a = ((1.0 - lx) * v00 + lx * v01)[None, :]
        z_a1 = ((1.0 - lx) * v10 + lx * v11)[None, :]
        s_acc = tl.zeros((ROWS, BLOCK_E), dtype=tl.float32)
    else:
        z = tl.load(l_base + a * slh + _nearest_src(px, w, scale_w) * slw, mask=mask_e, other=0.0).to(tl.float32)
        s_col = _sigmoid(z)
        s = s_col[None, :]
    partner = tl.load(PERM + n).to(tl.int64)
    x_base = X + n * sxn
    p_base = X + partner * sxn
    o_base = OUT + n * son
    for r0 in range(y_first, y_end, ROWS):
        yy = r0 + tl.arange(0, ROWS)
        row_in = yy < y_end
        m2 = row_in[:, None] & mask_e[None, :]
        if BILINEAR:
            _, _, ly = _src_index(yy, h, scale_h, True)
            ly = ly[:, None]
            s = _sigmoid((1.0 - ly) * z_a + ly * z_a1)
            s_acc += tl.where(row_in[:, None], s, 0.0)
        xo = yy[:, None] * sxh + ee[None, :] * sxe
        oo = yy[:, None] * soh + ee[None, :] * soe
        for c in range(0, planes):
            x_own = tl.load(x_base + c * sxc + xo, mask=m2, other=0.0).to(tl.float32)
            x_partner = tl.load(p_base + c * sxc + xo, mask=m2, other=0.0).to(tl.float32)
            # torch.lerp's two-sided formula, so fp32 results match the reference bit for bit.
            mixed = tl.where(s < 0.5, x_own + s * (x_partner - x_own), x_partner - (x_partner - x_own) * (1.0 - s))
            tl.store(o_base + c * soc + oo, mixed.to(OUT.dtype.element_ty), mask=m2)
    if BILINEAR:
        s_sum = tl.sum(tl.sum(tl.where(first[None, :], s_acc, 0.0), axis=1), axis=0)
    else:  # every row has the chunk's s; a logit row with no image row adds 0 (not 0 x s: NaN for a NaN logit)
        rows = (y_end - y_first).to(tl.float32)
        s_sum = tl.where(y_end > y_first, rows * tl.sum(tl.where(first, s_col, 0.0), axis=0), 0.0)
    tl.store(PART + n * spn + a * n_chunks + pid_e, s_sum)


@triton.jit
def _bwd_nearest(LOG, X, PERM, G, GS, DL,
                 H, W, h, w, scale_h, scale_w, inv_scale_h, inv_hw,
                 sln, slh, slw, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sgsn, sdn, sdh, sdw,
                 C: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr, CELLS: tl.constexpr,
                 BLOCK_B: tl.constexpr, HAS_G: tl.constexpr, HAS_GS: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    a = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    # The image rows of logit row a, exactly: [y_first, y_end), empty when H < h leaves a no row.
    y_first = _cell_start(a, H, h, scale_h, inv_scale_h)
    y_end = tl.where(a + 1 < h, _cell_start(a + 1, H, h, scale_h, inv_scale_h), H)
    # Row geometry, as the forward's (one assignment each: per_pixel must stay a constexpr for the
    # interpreter): channels-last x and g are walked by flat element e = x * C + c of a row;
    # otherwise by pixel e = x, once per channel plane, through x's and g's own strides.
    if CHANNELS_INNER:
        row_len = W * C
        per_pixel = C
        planes = 1
        sxe = 1
        sge = 1
    else:
        row_len = W
        per_pixel = 1
        planes = C
        sxe = sxw
        sge = sgw
    if HAS_G:
        partner = tl.load(PERM + n).to(tl.int64)
        x_base = X + n * sxn
        p_base = X + partner * sxn
        g_base = G + n * sgn
    if HAS_GS:  # d s_mean / d s = gs / (H W) at every pixel; an image column has y_end - y_first of them
        col_mean = tl.load(GS + n * sgsn).to(tl.float32) * inv_hw * (y_end - y_first).to(tl.float32)
    offs_b = tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, CELLS)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for e0 in range(0, row_len, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        mask_e = ee < row_len
        # Column sums over the cell row of sum_c g (x[perm] - x): the only per-element work.
        col = tl.zeros((BLOCK_E,), dtype=tl.float32)
        if HAS_G:
            part = tl.zeros((ROWS, BLOCK_E), dtype=tl.float32)
            for r0 in range(y_first, y_end, ROWS):
                yy = r0 + tl.arange(0, ROWS)
                m2 = (yy < y_end)[:, None] & mask_e[None, :]
                xo = yy[:, None] * sxh + ee[None, :] * sxe
                go = yy[:, None] * sgh + ee[None, :] * sge
                for c in range(0, planes):
                    x_own = tl.load(x_base + c * sxc + xo, mask=m2, other=0.0).to(tl.float32)
                    x_partner = tl.load(p_base + c * sxc + xo, mask=m2, other=0.0).to(tl.float32)
                    gg = tl.load(g_base + c * sgc + go, mask=m2, other=0.0).to(tl.float32)
                    part += gg * (x_partner - x_own)
            col = tl.sum(part, axis=0)
        px = ee // per_pixel
        if HAS_GS:  # once per pixel: on its first element
            col += tl.where(mask_e & (ee == px * per_pixel), col_mean, 0.0)
        # The chunk's columns into their logit columns, by the forward's index of each pixel,
        # CELLS consecutive logit columns at a time (elements past the row carry 0).
        bx = _nearest_src(px, w, scale_w)
        b_lo = _nearest_src(e0 // per_pixel, w, scale_w)
        b_hi = _nearest_src((tl.minimum(e0 + BLOCK_E, row_len) - 1) // per_pixel, w, scale_w)
        for j0 in range(b_lo, b_hi + 1, CELLS):
            hit = offs_j[:, None] == (bx - j0)[None, :]
            cells = tl.sum(tl.where(hit, col[None, :], 0.0), axis=1)
            acc += tl.sum(tl.where(offs_b[:, None] == (j0 + offs_j)[None, :], cells[None, :], 0.0), axis=1)
    # Every pixel of cell (a, b) has z = logits[a, b]: one s (1 - s) per cell.
    mask_b = offs_b < w
    z = tl.load(LOG + n * sln + a * slh + offs_b * slw, mask=mask_b, other=0.0).to(tl.float32)
    s = _sigmoid(z)
    tl.store(DL + n * sdn + a * sdh + offs_b * sdw, (acc * s * (1.0 - s)).to(DL.dtype.element_ty), mask=mask_b)


@triton.jit
def _bwd_rows(LOG, X, PERM, G, GS, T,
              H, W, h, w, C, scale_h, scale_w, inv_scale_w, inv_hw,
              sln, slh, slw, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sgsn, stn, sty, stb,
              ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
              HAS_G: tl.constexpr, HAS_GS: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    pid_y = tl.program_id(0)
    pid_b = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_r = pid_y * ROWS + tl.arange(0, ROWS)
    mask_r = offs_r < H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < w
    b_first = pid_b * BLOCK_B
    b_last = tl.minimum(b_first + BLOCK_B, w) - 1
    x_lo, x_hi = _footprint(b_first, b_last, W, w, inv_scale_w)
    # Start and end on multiples of 16 pixels and mask only by the image width, so the row's
    # loads are provably aligned and vectorize (contiguous layout); the extra pixels get zero
    # weight from wx below.
    x_lo = (x_lo // 16) * 16
    x_hi = ((x_hi + 15) // 16) * 16
    if HAS_GS:
        g_mean = tl.load(GS + n * sgsn).to(tl.float32) * inv_hw
    else:
        g_mean = 0.0
    l_base = LOG + n * sln
    if HAS_G:
        partner = tl.load(PERM + n).to(tl.int64)
        x_base = X + n * sxn
        p_base = X + partner * sxn
        g_base = G + n * sgn
    acc = tl.zeros((ROWS, BLOCK_B), dtype=tl.float32)
    if CHANNELS_INNER:
        # Channels-last x and g: a row is one dense run of W * C elements, walked by flat
        # element e = x * C + c (BLOCK_X counts elements here), so the loads are contiguous and
        # aligned whatever C is. dz is linear in ds, so the sum over c folds into the sum over x
        # below: each element contributes g (b - a) s (1 - s) to its pixel's column weights, and
        # each pixel's first element adds the s_mean term once.
        for e0 in range(x_lo * C, x_hi * C, BLOCK_X):
            ee = e0 + tl.arange(0, BLOCK_X)
            xx = ee // C
            m2 = mask_r[:, None] & (ee < W * C)[None, :]
            z = _bilinear_logit(l_base, slh, slw, offs_r[:, None], xx[None, :], m2, h, w, scale_h, scale_w)
            s = _sigmoid(z)
            ds = tl.zeros((ROWS, BLOCK_X), dtype=tl.float32) + tl.where((ee - xx * C) == 0, g_mean, 0.0)[None, :]
            if HAS_G:
                a = tl.load(x_base + offs_r[:, None] * sxh + ee[None, :], mask=m2, other=0.0).to(tl.float32)
                b = tl.load(p_base + offs_r[:, None] * sxh + ee[None, :], mask=m2, other=0.0).to(tl.float32)
                gg = tl.load(g_base + offs_r[:, None] * sgh + ee[None, :], mask=m2, other=0.0).to(tl.float32)
                ds += gg * (b - a)
            dz = tl.where(m2, ds * s * (1.0 - s), 0.0)
            x0i, x1i, lx = _src_index(xx, w, scale_w, True)
            wx = _tap_weight(x0i[:, None], x1i[:, None], lx[:, None], offs_b[None, :])
            acc += tl.sum(dz[:, :, None] * wx[None, :, :], axis=1)
    else:
        for x0 in range(x_lo, x_hi, BLOCK_X):
            xx = x0 + tl.arange(0, BLOCK_X)
            m2 = mask_r[:, None] & (xx < W)[None, :]
            z = _bilinear_logit(l_base, slh, slw, offs_r[:, None], xx[None, :], m2, h, w, scale_h, scale_w)
            s = _sigmoid(z)
            ds = tl.zeros((ROWS, BLOCK_X), dtype=tl.float32) + g_mean
            if HAS_G:
                pix = (offs_r[:, None] * sxh + xx[None, :] * sxw)[:, :, None]
                gpix = (offs_r[:, None] * sgh + xx[None, :] * sgw)[:, :, None]
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    m3 = m2[:, :, None] & (offs_c < C)[None, None, :]
                    a = tl.load(x_base + pix + offs_c[None, None, :] * sxc, mask=m3, other=0.0).to(tl.float32)
                    b = tl.load(p_base + pix + offs_c[None, None, :] * sxc, mask=m3, other=0.0).to(tl.float32)
                    gg = tl.load(g_base + gpix + offs_c[None, None, :] * sgc, mask=m3, other=0.0).to(tl.float32)
                    ds += tl.sum(gg * (b - a), axis=2)
            dz = tl.where(m2, ds * s * (1.0 - s), 0.0)
            x0i, x1i, lx = _src_index(xx, w, scale_w, True)
            wx = _tap_weight(x0i[:, None], x1i[:, None], lx[:, None], offs_b[None, :])
            acc += tl.sum(dz[:, :, None] * wx[None, :, :], axis=1)
    tl.store(T + n * stn + offs_r[:, None] * sty + offs_b[None, :] * stb, acc,
             mask=mask_r[:, None] & mask_b[None, :])


@triton.jit
def _bwd_cols(T, DL, H, h, w, scale_h, inv_scale_h,
              stn, sty, stb, sdn, sdh, sdw,
              BLOCK_Y: tl.constexpr, BLOCK_B: tl.constexpr):
    a = tl.program_id(0)
    pid_b = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < w
    y_lo, y_hi = _footprint(a, a, H, h, inv_scale_h)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for y0 in range(y_lo, y_hi, BLOCK_Y):
        yy = y0 + tl.arange(0, BLOCK_Y)
        mask_y = yy < y_hi
        i0, i1, ly = _src_index(yy, h, scale_h, True)
        wy = tl.where(mask_y, _tap_weight(i0, i1, ly, a), 0.0)
        t = tl.load(T + n * stn + yy[:, None] * sty + offs_b[None, :] * stb,
                    mask=mask_y[:, None] & mask_b[None, :], other=0.0)
        acc += tl.sum(wy[:, None] * t, axis=0)
    tl.store(DL + n * sdn + a * sdh + offs_b * sdw, acc.to(DL.dtype.element_ty), mask=mask_b)


# ----------------------------------------------------------------------------- host side

def _scale(in_size: int, out_size: int) -> float:
    """PyTorch's source/destination scale: a float32 quotient (exact as a Python float)."""
    return float(np.float32(in_size) / np.float32(out_size))


def _channels_inner(t: torch.Tensor) -> bool:
    """True when each image of t is one dense run in (y, x, c) order: channels_last, not a view."""
    N, C, H, W = t.shape
    return t.stride(1) == 1 and t.stride(3) == C and t.stride(2) == W * C and C > 1


# Per-signature plans of the launchers (see common.remember): everything but the tensors.
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _fwd_tile(H: int, h: int, row_len: int, channels_inner: bool) -> tuple[int, int, int]:
    """(ROWS, BLOCK_E, warps) of the forward: a tile of ROWS image rows x BLOCK_E row elements.

    A 256-element row chunk is 8 elements a lane, 16 bytes in fp16/bf16 (32 in fp32). Channels-
    last: 2 rows a step in one warp (as many instructions a byte as 1 row, twice the bytes in
    flight); a lane holds both rows of its columns. Pixel rows: 2 rows a step, a warp each, the
    channel-plane loop unrolled; a plane's loads wait for the previous plane's store (x_mix may
    alias x as far as the compiler knows), so the bytes in flight come from resident warps, and
    an ImageNet grid has 27 programs an SM: 2 warps a program keep twice as many loads in
    flight as 1 (one warp with both rows: a loop over the planes, 147 registers in bilinear mode).
    A row of at most 128 elements gets a narrower tile and more rows (up to a logit row's), one
    warp, still 8 elements a lane."""
    cell_rows = pow2(cdiv(H, h))
    if row_len > 128:
        rows = min(cell_rows, 2)
        return rows, 256, 1 if channels_inner else rows
    rows = min(cell_rows, 256 // pow2(row_len, 8))
    return rows, max(pow2(row_len, 8), 256 // rows), 1


def _fwd_plan(logits: torch.Tensor, x: torch.Tensor, mode: str) -> tuple:
    """(x_mix shape and strides, partial buffer shape and strides, grid, scalar arguments, launch
    keywords, H * W as a 0-d float32 CPU tensor) of the forward launch for this signature."""
    N, C, H, W = x.shape
    h, w = logits.shape[-2:]
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(x.shape, device="meta", memory_format=memory_format)  # x_mix's layout
    channels_inner = _channels_inner(x) and _channels_inner(out)
    row_len = W * C if channels_inner else W
    rows, block_e, warps = _fwd_tile(H, h, row_len, channels_inner)
    n_chunks = cdiv(row_len, block_e)
    partial = (N, h * n_chunks)
    partial_stride = layout(partial)
    # logits is passed whole with the strides of logits[:, 0] (the same address: no view to build).
    args = (H, W, h, w, _scale(h, H), _scale(w, W), H / h, n_chunks,
            logits.stride(0), *logits.stride()[2:], *x.stride(), *out.stride(), partial_stride[0])
    kwargs = dict(C=C, ROWS=rows, BLOCK_E=block_e, BILINEAR=(mode == "bilinear"), CHANNELS_INNER=channels_inner,
                  num_warps=warps)
    # s_mean = sum of the partials / (H * W); a 0-d CPU tensor divides as the Python int does
    # (the same float32 division), without wrapping the int into a tensor on every call.
    hw = torch.tensor(H * W, dtype=torch.float32)
    return x.shape, out.stride(), partial, partial_stride, (n_chunks, h, N), args, kwargs, hw


def mask_mix_forward(logits: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, mode: str):
    key = (x.shape, x.stride(), x.dtype, logits.shape, logits.stride(), mode)  # dtype: a plan may depend on it
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = remember(_FWD_PLANS, key, _fwd_plan(logits, x, mode))
    shape, out_stride, partial_shape, partial_stride, grid, args, kwargs, hw = plan
    device = x.device
    out = new_strided(shape, out_stride, x.dtype, device)
    partial = new_strided(partial_shape, partial_stride, torch.float32, device)
    launch(_fwd, grid, logits, x, perm, out, partial, *args, **kwargs)
    s_mean = partial.sum(dim=1).div_(hw)  # in place: one buffer fewer
    return out, s_mean


def _nearest_bwd_plan(logits: torch.Tensor, x: torch.Tensor, g, g_smean) -> tuple:
    """(d logits shape and strides, grid, scalar arguments (after the tensors), launch keywords)
    of `_bwd_nearest` for this signature."""
    N, C, H, W = x.shape
    h, w = logits.shape[-2:]
    has_g, has_gs = g is not None, g_smean is not None
    g_arg = g if has_g else x
    channels_inner = has_g and _channels_inner(x) and _channels_inner(g)
    row_len = W * C if channels_inner else W
    # One warp a program; a tile of 2 image rows x BLOCK_E row elements. 256 elements are 16
    # bytes a lane in fp16/bf16 (32 in fp32) per row, and both rows stay inside each lane, so
    # summing them needs no shuffle: 96-192 bytes in flight a lane per iteration, 57-72 registers
    # (4 rows: as many instructions a byte, up to 110 registers in fp32, a spill on sm_80 for
    # contiguous fp16/bf16). Shorter rows get a narrower tile that still holds 8 elements a lane.
    rows = pow2(cdiv(H, h), 1, 2)
    block_e = 256 if row_len > 128 else max(pow2(row_len), 256 // rows)
    # Column sums go to CELLS logit columns at a time, a [CELLS, BLOCK_E] one-hot: 4 (8 or 16
    # take 119-223 registers on sm_80 for the same work).
    block_b = pow2(w)
    cells = min(4, block_b)
    lg_stride = (logits.stride(0), *logits.stride()[2:])
    dl_stride = layout((N, 1, h, w))
    args = (H, W, h, w, _scale(h, H), _scale(w, W), H / h, 1.0 / (H * W),
            *lg_stride, *x.stride(), *g_arg.stride(), g_smean.stride(0) if has_gs else 0,
            dl_stride[0], *dl_stride[2:])
    kwargs = dict(C=C, ROWS=rows, BLOCK_E=block_e, CELLS=cells, BLOCK_B=block_b, HAS_G=has_g, HAS_GS=has_gs,
                  CHANNELS_INNER=channels_inner, num_warps=1)
    return (N, 1, h, w), dl_stride, (h, N), args, kwargs


def _bilinear_bwd_plan(logits: torch.Tensor, x: torch.Tensor, g, g_smean) -> tuple:
    """(d logits shape and strides, t buffer shape and strides, rows grid, rows scalar arguments
    (after the tensors), rows launch keywords, cols grid, cols scalar arguments (after the two
    tensors), cols launch keywords) of `_bwd_rows` and `_bwd_cols` for this signature."""
    N, C, H, W = x.shape
    h, w = logits.shape[-2:]
    block_x = pow2(W, 16, 256)
    block_b = pow2(w, 2, 64)
    block_c = pow2(C, hi=4)
    # Rows per program: ~256 pixels per tile and the (rows, x, b) product tile of the contraction
    # with wx at most 4096 elements: ~128 registers instead of 255 at the CIFAR shape, and 4x
    # the programs there (400 rather than 100 at batch 100).
    rows = max(1, min(256 // block_x, 4096 // (block_x * block_b), pow2(H)))
    t = (N, H, w)
    t_stride = layout(t)
    has_g, has_gs = g is not None, g_smean is not None
    g_arg = g if has_g else x
    channels_inner = _channels_inner(x) and _channels_inner(g_arg)
    warps = 4
    if channels_inner:
        # BLOCK_X counts elements of a row (x * C + c): 512-element tiles over 2 warps, 8 a
        # thread (16-byte loads in fp16/bf16), and 8 logit columns, so the contraction with wx
        # holds 64 products a thread.
        block_x = pow2(W * C, 16, 512)
        block_b = min(8, block_b)
        rows = max(1, min(512 // block_x, pow2(H)))
        warps = 2
    # logits and d logits are passed whole with the strides of their [:, 0] views.
    lg_stride = (logits.stride(0), *logits.stride()[2:])
    rows_args = (H, W, h, w, C, _scale(h, H), _scale(w, W), W / w, 1.0 / (H * W),
                 *lg_stride, *x.stride(), *g_arg.stride(), g_smean.stride(0) if has_gs else t_stride[0], *t_stride)
    rows_kwargs = dict(ROWS=rows, BLOCK_X=block_x, BLOCK_C=block_c, BLOCK_B=block_b,
                       HAS_G=has_g, HAS_GS=has_gs, CHANNELS_INNER=channels_inner, num_warps=warps)
    dl_stride = layout((N, 1, h, w))
    block_y = pow2(math.ceil(2 * H / h) + 6, 16, 64)
    cols_args = (H, h, w, _scale(h, H), H / h, *t_stride, dl_stride[0], *dl_stride[2:])
    cols_kwargs = dict(BLOCK_Y=block_y, BLOCK_B=block_b, num_warps=4)
    return ((N, 1, h, w), dl_stride, t, t_stride, (cdiv(H, rows), cdiv(w, block_b), N), rows_args, rows_kwargs,
            (h, cdiv(w, block_b), N), cols_args, cols_kwargs)


def mask_mix_backward(logits, x, perm, mode, g, g_smean):
    """d logits (N, 1, h, w) in logits' dtype; g or g_smean may be None (no gradient)."""
    key = (x.shape, x.stride(), x.dtype, logits.shape, logits.stride(), mode,
           None if g is None else g.stride(), None if g_smean is None else g_smean.stride())
    plan = _BWD_PLANS.get(key)
    if plan is None:
        build = _nearest_bwd_plan if mode == "nearest" else _bilinear_bwd_plan
        plan = remember(_BWD_PLANS, key, build(logits, x, g, g_smean))
    dlogits = new_strided(plan[0], plan[1], logits.dtype, logits.device)
    g_arg = x if g is None else g
    if mode == "nearest":
        grid, args, kwargs = plan[2:]
        launch(_bwd_nearest, grid, logits, x, perm, g_arg, logits if g_smean is None else g_smean, dlogits,
               *args, **kwargs)
        return dlogits
    t_shape, t_stride, rows_grid, rows_args, rows_kwargs, cols_grid, cols_args, cols_kwargs = plan[2:]
    t = new_strided(t_shape, t_stride, torch.float32, x.device)
    launch(_bwd_rows, rows_grid, logits, x, perm, g_arg, t if g_smean is None else g_smean, t,
           *rows_args, **rows_kwargs)
    launch(_bwd_cols, cols_grid, t, dlogits, *cols_args, **cols_kwargs)
    return dlogits


class MaskMix(torch.autograd.Function):
    """The eager autograd path: the fewest host steps per call."""

    @staticmethod
    def forward(ctx, logits, x, perm, mode):
        x_mix, s_mean = mask_mix_forward(logits, x, perm, mode)
        _save(ctx, (logits, x, perm, mode))
        return x_mix, s_mean

    @staticmethod
    def backward(ctx, g, g_smean):
        grads = _backward(ctx, g, g_smean, mask_mix_backward)
        if torch.is_grad_enabled():  # create_graph=True: differentiating these again must raise
            grads = first_order_only("mask_mix", grads, (g, g_smean, ctx.saved_tensors[0]))
        return grads


def _save(ctx, inputs) -> None:
    logits, x, perm, mode = inputs
    ctx.save_for_backward(logits, x.detach(), perm)
    ctx.mode = mode
    ctx.set_materialize_grads(False)


def _backward(ctx, g, g_smean, backward):
    """(d logits, None, None, None) from `backward(logits, x, perm, mode, g, g_smean)`."""
    logits, x, perm = ctx.saved_tensors
    if (g is None and g_smean is None) or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return backward(logits, x, perm, ctx.mode, g, g_smean), None, None, None


# The same launchers as torch custom ops (torch.ops.automix_fast.mask_mix_fwd / _bwd), with fake
# (shape-only) implementations and the autograd formula, so torch.compile traces through them.
if not op_registered("mask_mix_fwd"):

    def _fake_fwd(logits, x, perm, mode):
        memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return torch.empty_like(x, memory_format=memory_format), x.new_empty((x.shape[0],), dtype=torch.float32)

    _fwd_op = define_op("mask_mix_fwd", "(Tensor logits, Tensor x, Tensor perm, str mode) -> (Tensor, Tensor)",
                        mask_mix_forward, _fake_fwd)
    define_op("mask_mix_bwd",
              "(Tensor logits, Tensor x, Tensor perm, str mode, Tensor? g, Tensor? g_smean) -> Tensor",
              mask_mix_backward,
              lambda logits, x, perm, mode, g, g_smean: logits.new_empty((logits.shape[0], 1, *logits.shape[-2:])))
    _fwd_op.register_autograd(
        lambda ctx, g, g_smean: _backward(ctx, g, g_smean, torch.ops.automix_fast.mask_mix_bwd),
        setup_context=lambda ctx, inputs, output: _save(ctx, inputs))


def mask_mix(logits: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, mode: str = "nearest"):
    """(x_mix in x's dtype and memory format, s_mean (N,) fp32); differentiable in logits.

    Eager calls run the autograd Function; under torch.compile the custom op
    automix_fast::mask_mix_fwd (same launchers, same numbers) is traced instead.
    First-order only, as `mixblock_attention`: after a backward with create_graph=True a second
    backward through d logits raises; the torch reference (backend="torch") has higher orders.
    Arguments are validated by `automix_fast.ops.mask_mix`; call that instead.
    """
    if x.requires_grad:  # x is data and gets no gradient: it alone must not make the outputs require grad
        x = x.detach()
    if torch.compiler.is_compiling():
        return torch.ops.automix_fast.mask_mix_fwd(logits, x, perm, mode)
    if needs_autograd(logits):
        return MaskMix.apply(logits, x, perm, mode)
    return mask_mix_forward(logits, x, perm, mode)
