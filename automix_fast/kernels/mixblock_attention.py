"""Fused Mix Block cross-attention with a one-channel value: forward and backward in Triton.

Math (per sample n; i runs over the L queries, j over the Lk keys, d over D):

    S_ij   = scale * sum_d q_id k_jd
    P_ij   = softmax_j(S_ij) = exp(S_ij - lse_i),   lse_i = log sum_j exp(S_ij)
    out_i  = sum_j P_ij v_j                                     (N, L) float32

Backward, with g_i = d loss / d out_i. Because v has one channel, flash-attention's
Delta_i = sum_j P_ij dP_ij collapses to out_i:

    dv_j   = sum_i P_ij g_i
    dS_ij  = P_ij g_i (v_j - out_i)
    dq_i   = scale * sum_j dS_ij k_j
    dk_j   = scale * sum_i dS_ij q_i

Design:
- Forward (`_fwd`): one program per (block of BLOCK_M queries, sample). It walks the keys in
  blocks of BLOCK_N with an online softmax (running max m_i, running sum l_i, running
  P.v numerator), so the N x L x Lk matrix never exists. Scores are accumulated over D in
  chunks of BLOCK_D (D = 512 for ResNet-50's Mix Block does not fit one tile). The only
  saved statistic is lse_i, kept in base 2 (lse2_i = lse_i * log2(e)) so the kernels use exp2.
- Backward: two kernels, no atomics, so two runs are bitwise equal.
  `_bwd_dq` owns a block of queries, `_bwd_dkdv` owns a block of keys; each recomputes P
  from lse. When the other side fits one tile (<= 256 positions, every Mix Block preset:
  L = 64, 196 or 256), a program computes its whole dS tile once and then writes its gradient
  D-chunk by D-chunk (no accumulator wider than BLOCK_D); fp16/bf16 programs own 64 rows,
  wgmma's minimum on sm_90. Otherwise a program owns one (row block, D chunk) output tile and
  loops over the other side, recomputing scores (correct for any L; scores are recomputed
  once per D chunk, 128 columns wide for fp16/bf16). `attention_backward(tiling=...)` can force
  either way ("one-tile" where the other side fits, "tiled" always): in fp16/bf16 at D <= 128
  the tiled way recomputes nothing either (one 128-column chunk), and at L = 196-256 its tiles
  need fewer registers (more programs per SM), so benchmarks can measure which is faster at a
  shape (bench_ops.py's `triton-tiled`).
- Tile sizes and warps were chosen from the sm_80 / sm_90 compile report of
  bench/aot_compile.py (no spills in fp16/bf16, wgmma on sm_90), which CI regenerates.
- Precision: products of fp16/bf16 tiles are exact in fp32 and every accumulation is fp32.
  The second GEMM of the backward (dS @ k, dS^T @ q) feeds dS in the input dtype, as
  flash-attention does. fp32 inputs use IEEE fp32 dots (no TF32).
  Under TRITON_INTERPRET=1 tiles are cast to fp32 before `tl.dot` (the interpreter's
  low-precision dot is wrong); the products are exact either way, so the math is the same.
- Every stride is passed; nothing is made contiguous. Gradients come back in the inputs'
  dtypes, laid out contiguously.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from automix_fast.kernels.common import (cdiv, define_op, first_order_only, layout, needs_autograd, new_strided,
                                         op_registered, pow2, remember, tl_dtype, triton_interpret)
from automix_fast.kernels.launches import launch

__all__ = ["mixblock_attention", "attention_forward", "attention_backward"]

LOG2E = 1.4426950408889634
ONE_TILE_MAX = 256  # the "other side" is handled in a single tile up to this many positions
BWD_TILINGS = ("auto", "one-tile", "tiled")  # attention_backward's ways of tiling (auto: one tile when it fits)


@triton.jit
def _scores(a_base, b_base, offs_a, offs_b, mask_a, mask_b, sa_row, sa_d, sb_row, sb_d, D,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Unscaled A @ B^T for a (BLOCK_A, BLOCK_B) tile, summed over D in BLOCK_D chunks, fp32."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(a_base + offs_a[:, None] * sa_row + offs_d[None, :] * sa_d,
                    mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        bt = tl.load(b_base + offs_b[None, :] * sb_row + offs_d[:, None] * sb_d,
                     mask=mask_b[None, :] & mask_d[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd(Q, K, V, OUT, LSE,
         L, LK, D, qk_scale,
         sqn, sql, sqd, skn, skl, skd, svn, svl, son, sol, sln, sll,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    q_base = Q + n * sqn
    k_base = K + n * skn
    v_base = V + n * svn

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, LK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < LK
        s = _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, sql, sqd, skl, skd, D,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_base + offs_n * svl, mask=mask_n, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha + tl.sum(p * v[None, :], axis=1)
        m_i = m_new
    out = acc / l_i
    lse2 = m_i + tl.log2(l_i)
    tl.store(OUT + n * son + offs_m * sol, out, mask=mask_m)
    tl.store(LSE + n * sln + offs_m * sll, lse2, mask=mask_m)


@triton.jit
def _bwd_dq(Q, K, V, OUT, LSE, G, DQ,
            L, LK, D, qk_scale, scale,
            sqn, sql, sqd, skn, skl, skd, svn, svl, son, sol, sln, sll, sgn, sgl,
            sdqn, sdql, sdqd,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            ONE_TILE: tl.constexpr, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    q_base = Q + n * sqn
    k_base = K + n * skn
    lse = tl.load(LSE + n * sln + offs_m * sll, mask=mask_m, other=0.0)
    o = tl.load(OUT + n * son + offs_m * sol, mask=mask_m, other=0.0)
    g = tl.load(G + n * sgn + offs_m * sgl, mask=mask_m, other=0.0).to(tl.float32)
    dq_base = DQ + n * sdqn

    if ONE_TILE:
        # All keys in one tile: dS once, then dq chunk by chunk over D.
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < LK
        s = _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, sql, sqd, skl, skd, D,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :]
        p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        v = tl.load(V + n * svn + offs_n * svl, mask=mask_n, other=0.0).to(tl.float32)
        ds = (p * g[:, None] * (v[None, :] - o[:, None])).to(IN_DTYPE).to(DOT_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            kt = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :] * skd,
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            dq = tl.dot(ds, kt.to(DOT_DTYPE), input_precision=PRECISION) * scale
            tl.store(dq_base + offs_m[:, None] * sdql + offs_d[None, :] * sdqd,
                     dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    else:
        # This program owns the (query block, D chunk) tile and loops over key blocks.
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, LK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < LK
            s = _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, sql, sqd, skl, skd, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)
            valid = mask_m[:, None] & mask_n[None, :]
            p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            v = tl.load(V + n * svn + offs_n * svl, mask=mask_n, other=0.0).to(tl.float32)
            ds = (p * g[:, None] * (v[None, :] - o[:, None])).to(IN_DTYPE).to(DOT_DTYPE)
            kt = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :] * skd,
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(ds, kt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        tl.store(dq_base + offs_m[:, None] * sdql + offs_d[None, :] * sdqd,
                 (acc * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _bwd_dkdv(Q, K, V, OUT, LSE, G, DK, DV,
              L, LK, D, qk_scale, scale,
              sqn, sql, sqd, skn, skl, skd, svn, svl, son, sol, sln, sll, sgn, sgl,
              sdkn, sdkl, sdkd, sdvn, sdvl,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              ONE_TILE: tl.constexpr, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # Tiles here are transposed: rows are keys (BLOCK_N), columns queries (BLOCK_M).
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < LK
    q_base = Q + n * sqn
    k_base = K + n * skn
    v = tl.load(V + n * svn + offs_n * svl, mask=mask_n, other=0.0).to(tl.float32)
    dk_base = DK + n * sdkn

    if ONE_TILE:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        lse = tl.load(LSE + n * sln + offs_m * sll, mask=mask_m, other=0.0)
        o = tl.load(OUT + n * son + offs_m * sol, mask=mask_m, other=0.0)
        g = tl.load(G + n * sgn + offs_m * sgl, mask=mask_m, other=0.0).to(tl.float32)
        st = _scores(k_base, q_base, offs_n, offs_m, mask_n, mask_m, skl, skd, sql, sqd, D,
                     BLOCK_N, BLOCK_M, BLOCK_D, DOT_DTYPE, PRECISION)
        valid = mask_n[:, None] & mask_m[None, :]
        pt = tl.where(valid, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        pg = pt * g[None, :]
        dv = tl.sum(pg, axis=1)
        dst = (pg * (v[:, None] - o[None, :])).to(IN_DTYPE).to(DOT_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            qt = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            dk = tl.dot(dst, qt.to(DOT_DTYPE), input_precision=PRECISION) * scale
            tl.store(dk_base + offs_n[:, None] * sdkl + offs_d[None, :] * sdkd,
                     dk.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        tl.store(DV + n * sdvn + offs_n * sdvl, dv.to(DV.dtype.element_ty), mask=mask_n)
    else:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, L, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < L
            lse = tl.load(LSE + n * sln + offs_m * sll, mask=mask_m, other=0.0)
            o = tl.load(OUT + n * son + offs_m * sol, mask=mask_m, other=0.0)
            g = tl.load(G + n * sgn + offs_m * sgl, mask=mask_m, other=0.0).to(tl.float32)
            st = _scores(k_base, q_base, offs_n, offs_m, mask_n, mask_m, skl, skd, sql, sqd, D,
                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_DTYPE, PRECISION)
            valid = mask_n[:, None] & mask_m[None, :]
            pt = tl.where(valid, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
            pg = pt * g[None, :]
            dv += tl.sum(pg, axis=1)
            dst = (pg * (v[:, None] - o[None, :])).to(IN_DTYPE).to(DOT_DTYPE)
            qt = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(dst, qt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        tl.store(dk_base + offs_n[:, None] * sdkl + offs_d[None, :] * sdkd,
                 (acc * scale).to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        if pid_d == 0:
            tl.store(DV + n * sdvn + offs_n * sdvl, dv.to(DV.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------- host side

# Whether the kernels above run under triton's interpreter: triton.jit decides that when it
# decorates them, at this module's import.
INTERPRETED = triton_interpret()


def _dot_settings(dtype: torch.dtype):
    """(operand dtype for tl.dot, input_precision)."""
    if dtype == torch.float32 or INTERPRETED:
        return tl.float32, "ieee"
    return tl_dtype(dtype), "ieee"


def _d_chunk(D: int, dtype: torch.dtype) -> int:
    # 64 columns of fp16/bf16 (128 B rows) or 32 of fp32 per chunk; smaller when D is small.
    return pow2(D, 16, 32 if dtype == torch.float32 else 64)


def _fwd_config(L: int, LK: int, D: int, dtype: torch.dtype):
    block_m = pow2(L, 16, 64)
    block_n = pow2(LK, 16, 64)  # 128-key tiles spill on sm_80 in fp16/bf16
    warps = 8 if block_m * block_n >= 8192 else 4
    return block_m, block_n, _d_chunk(D, dtype), warps


def _bwd_config(rows: int, other: int, D: int, dtype: torch.dtype, tiling: str = "auto"):
    """Blocks for a backward kernel that owns `rows` positions and reduces over `other`, tiled
    as `tiling` (BWD_TILINGS) says.

    Returns (own block, other block, D chunk, one_tile, D chunks in the grid, warps).
    """
    chunk = _d_chunk(D, dtype)
    fits = pow2(other, 16) <= ONE_TILE_MAX
    if tiling == "one-tile" and not fits:
        raise ValueError(f"attention backward: tiling 'one-tile' needs at most {ONE_TILE_MAX} positions, got {other}")
    if tiling != "tiled" and fits:
        block_other = pow2(other, 16)
        if dtype == torch.float32:  # IEEE fp32 dots use no tensor cores; small tiles spill less
            block_own = min(pow2(rows, 16), max(16, 8192 // block_other), 64)
        else:  # 64 owned rows: wgmma's minimum M on sm_90 (32-row tiles fall back to mma.sync)
            block_own = pow2(rows, 16, 64)
        warps = 8 if block_own * block_other >= 8192 else 4
        return block_own, block_other, chunk, True, 1, warps
    # Tiled: a program owns (row block, D chunk) and recomputes the scores once per chunk, so
    # wider chunks for fp16/bf16 (128 columns, 8 warps) halve that recomputation.
    block_own = pow2(rows, 16, 64)
    block_other = 64
    if dtype != torch.float32:
        chunk = pow2(D, 16, 128)
    return block_own, block_other, chunk, False, cdiv(D, chunk), 8  # fp32 with 4 warps spills ~300 B on sm_80


# Per-signature plans of the launchers (see common.remember): everything but the tensors.
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _fwd_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple:
    """(out / lse shape and strides, grid, scalar arguments after the tensors, launch keywords)."""
    N, L, D = q.shape
    LK = k.shape[1]
    shape = (N, L)
    stride = layout(shape)
    block_m, block_n, block_d, warps = _fwd_config(L, LK, D, q.dtype)
    dot_dtype, precision = _dot_settings(q.dtype)
    args = (L, LK, D, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *stride, *stride)
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=warps, num_stages=2)
    return shape, stride, (cdiv(L, block_m), N), args, kwargs


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out (N, L) fp32, lse2 (N, L) fp32 in base 2) without building the N x L x Lk matrix."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, scale)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = remember(_FWD_PLANS, key, _fwd_plan(q, k, v, scale))
    shape, stride, grid, args, kwargs = plan
    device = q.device
    out = new_strided(shape, stride, torch.float32, device)
    lse = new_strided(shape, stride, torch.float32, device)
    launch(_fwd, grid, q, k, v, out, lse, *args, **kwargs)
    return out, lse


def _bwd_plan(q, k, v, out, lse, g, scale: float, need_dq: bool, need_dkdv: bool, tiling: str) -> tuple:
    """(scalar arguments shared by both kernels, then per kernel None when not asked for, else
    its buffers' shapes and strides, grid, its own stride arguments and launch keywords)."""
    N, L, D = q.shape
    LK = k.shape[1]
    dot_dtype, precision = _dot_settings(q.dtype)
    common = (L, LK, D, scale * LOG2E, scale,
              *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *g.stride())
    dq_plan = dkdv_plan = None
    if need_dq:
        dq = (N, L, D)
        dq_stride = layout(dq)
        bm, bn, bd, one, nd, warps = _bwd_config(L, LK, D, q.dtype, tiling)
        dq_plan = (dq, dq_stride, (cdiv(L, bm), nd, N), dq_stride,
                   dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_TILE=one, IN_DTYPE=tl_dtype(q.dtype),
                        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=warps, num_stages=2))
    if need_dkdv:
        dk, dv = (N, LK, D), (N, LK)
        dk_stride, dv_stride = layout(dk), layout(dv)
        bn, bm, bd, one, nd, warps = _bwd_config(LK, L, D, q.dtype, tiling)
        dkdv_plan = (dk, dk_stride, dv, dv_stride, (cdiv(LK, bn), nd, N), (*dk_stride, *dv_stride),
                     dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_TILE=one, IN_DTYPE=tl_dtype(q.dtype),
                          DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=warps, num_stages=2))
    return common, dq_plan, dkdv_plan


def attention_backward(q, k, v, out, lse, g, scale: float, need_dq: bool = True, need_dkdv: bool = True,
                       tiling: str = "auto"):
    """(dq, dk, dv) in the inputs' dtypes; None for the ones not asked for. `tiling`: BWD_TILINGS."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), lse.stride(), g.stride(), q.dtype,
           scale, need_dq, need_dkdv, tiling)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        if tiling not in BWD_TILINGS:
            raise ValueError(f"attention backward: tiling must be one of {', '.join(BWD_TILINGS)}, got {tiling!r}")
        plan = remember(_BWD_PLANS, key, _bwd_plan(q, k, v, out, lse, g, scale, need_dq, need_dkdv, tiling))
    common, dq_plan, dkdv_plan = plan
    dq = dk = dv = None
    if dq_plan is not None:
        shape, stride, grid, strides, kwargs = dq_plan
        dq = new_strided(shape, stride, q.dtype, q.device)
        launch(_bwd_dq, grid, q, k, v, out, lse, g, dq, *common, *strides, **kwargs)
    if dkdv_plan is not None:
        dk_shape, dk_stride, dv_shape, dv_stride, grid, strides, kwargs = dkdv_plan
        dk = new_strided(dk_shape, dk_stride, k.dtype, k.device)
        dv = new_strided(dv_shape, dv_stride, v.dtype, v.device)
        launch(_bwd_dkdv, grid, q, k, v, out, lse, g, dk, dv, *common, *strides, **kwargs)
    return dq, dk, dv


class MixBlockAttention(torch.autograd.Function):
    """The eager autograd path: the fewest host steps per call."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attention_forward(q, k, v, scale)
        _save(ctx, (q, k, v, scale), (out, lse))
        return out

    @staticmethod
    def backward(ctx, g):
        grads = _backward(ctx, g, attention_backward)
        if torch.is_grad_enabled():  # create_graph=True: differentiating these again must raise
            grads = first_order_only("mixblock_attention", grads, (g, *ctx.saved_tensors[:3]))
        return grads


def _save(ctx, inputs, outputs) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *outputs)
    ctx.scale = scale


def _backward(ctx, g, backward):
    """(dq, dk, dv, None) from `backward(q, k, v, out, lse, g, scale, need_dq, need_dkdv)`."""
    q, k, v, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if g is None:
        return None, None, None, None
    dq, dk, dv = backward(q, k, v, out, lse, g, ctx.scale, need_dq=need_q, need_dkdv=need_k or need_v)
    return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None


# The same launchers as torch custom ops (torch.ops.automix_fast.mixblock_attention_fwd / _bwd),
# with fake (shape-only) implementations and the autograd formula, so torch.compile traces
# through them. The backward op returns an empty tensor for a gradient it was not asked for.
if not op_registered("mixblock_attention_fwd"):

    def _or_empty(grads, inputs) -> tuple:
        """Each gradient, or a new empty tensor of its input's dtype where it is None: one each,
        since the outputs of a custom op must not alias one another."""
        return tuple(t.new_empty(0) if d is None else d for d, t in zip(grads, inputs))

    def _bwd_impl(q, k, v, out, lse, g, scale, need_dq, need_dkdv):
        grads = attention_backward(q, k, v, out, lse, g, scale, need_dq=need_dq, need_dkdv=need_dkdv)
        return _or_empty(grads, (q, k, v))

    def _fake_bwd(q, k, v, out, lse, g, scale, need_dq, need_dkdv):
        grads = (q.new_empty(q.shape) if need_dq else None, k.new_empty(k.shape) if need_dkdv else None,
                 v.new_empty(v.shape) if need_dkdv else None)
        return _or_empty(grads, (q, k, v))

    _fwd_op = define_op("mixblock_attention_fwd", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
                        attention_forward,
                        lambda q, k, v, scale: (q.new_empty(q.shape[:2], dtype=torch.float32),
                                                q.new_empty(q.shape[:2], dtype=torch.float32)))
    define_op("mixblock_attention_bwd",
              "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor g, float scale, bool need_dq, "
              "bool need_dkdv) -> (Tensor, Tensor, Tensor)",
              _bwd_impl, _fake_bwd)

    def _setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # lse
        ctx.set_materialize_grads(False)
        _save(ctx, inputs, output)

    _fwd_op.register_autograd(
        lambda ctx, g, g_lse: _backward(ctx, g, torch.ops.automix_fast.mixblock_attention_bwd),
        setup_context=_setup_context)


def mixblock_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for a one-channel v: (N, L) float32, differentiable in q, k, v.

    Eager calls run the autograd Function; under torch.compile the custom op
    automix_fast::mixblock_attention_fwd (same launchers, same numbers) is traced instead.
    First-order only: the kernels' gradients are not themselves differentiable, so after a
    backward with create_graph=True a second backward through them raises (eager:
    `first_order_only`; compiled: torch.compile refuses double backward); the torch reference
    (backend="torch") has higher-order gradients.
    Arguments are validated by `automix_fast.ops.mixblock_attention`; call that instead.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return torch.ops.automix_fast.mixblock_attention_fwd(q, k, v, float(scale))[0]
    if needs_autograd(q, k, v):
        return MixBlockAttention.apply(q, k, v, float(scale))
    return attention_forward(q, k, v, float(scale))[0]
