"""A fused Triton kernel for dilated attention (docs/design.md §1-2, §7), forward and backward.

Layouts: q, k, v, out and the gradients are (B, N, H, D) with any strides
whose last dimension is contiguous; lse and delta are (B, N, H) float32.

How it works (no gather copies, no per-segment launches):

- Per pattern (w, r), one launch covers every segment, head offset, batch item
  and head: program (i, bh) takes block ``i % nblk`` of the kept rows of
  segment ``i // nblk`` in head ``bh % H`` of batch item ``bh // H``. Kept row
  j of segment a in head h lives at position ``a + s + j * r`` (s = h mod r),
  so a block of kept rows is read with row stride ``r * stride_N`` directly
  from the caller's tensors. This is the kept-rows rule of
  :mod:`longnet.patterns` (``head_offset``, ``kept_count``), spelled once
  for the device in ``_program_rows``; the host side calls the rule itself. The tail segment is shorter; segments or heads
  that keep no row, and blocks past a segment's kept count, exit at once.
  A segment phase φ (see :mod:`longnet.patterns`) adds a leading segment
  [0, φ) as segment 0 and shifts the others to start at φ + j*w
  (``segment_start``); the kernels take φ like w and r.
- Inside a segment, attention is flash-style (online softmax in fp32 on
  exp2). In kept-row coordinates the causal mask is the plain lower
  triangle, because query and key rows share offset and stride.
- The mixture merge (docs/design.md §2) is the forward kernel's epilogue: pattern i
  reads the running (out, lse) of the rows it keeps, merges its own (o_i,
  lse_i) with the stable formula and writes them back. Within one launch no
  two programs touch the same (row, head), and launches run in order, so no
  atomics are needed. An r = 1 pattern runs first and just stores (it covers
  every row); with no r = 1 pattern the buffers start at (0, -inf), which is
  the right answer for rows kept by no pattern.
- Backward (exact): delta = rowsum(dO * O_merged) - dlse once, then per
  pattern a dk/dv kernel (outer loop over key blocks) and a dq kernel (outer
  loop over query blocks) recompute P = exp(S - lse_merged). That is each
  pattern's share of the gradient of the mixture, weights included; shares
  are summed into fp32 buffers (plain load-add-store, launches run in order).
  The dlse term is exact too: d lse_p / d s_pj = P_pj, so it only shifts delta.

Dtypes: fp16 and bf16 (fp32 accumulation); fp32 too (IEEE dots), which only
the CPU interpreter tests use. Head dims 16, 32, 64, 128. Offsets are 64-bit,
so large tensors need no chunking.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before Triton
is imported), which is how the tests exercise them. In that mode the backend
registers with a priority below every other backend, so ``backend=None``
never picks the slow interpreter; ``backend="triton"`` still selects it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..patterns import clip_phase, clip_segment, kept_count, segment_groups
from . import kernels
from .numerics import last_dim_contiguous
from .numerics import acc_dtype, default_scale

__all__ = ["dilated_attention_triton", "supports", "why_not", "backend_fn", "BlockConfig", "default_config", "INTERPRET",
           "TRITON_VERSION"]

TRITON_VERSION = triton.__version__
# Triton reads this when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_GPU_DTYPES = (torch.float16, torch.bfloat16)
_INTERP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# bf16 dots need Ampere; older GPUs fall back to the torch backend (why_not).
MIN_CAPABILITY = (8, 0)
# Rows per program of _bwd_preprocess.
PREPROCESS_ROWS = 64
# The CUDA grid's y dimension holds batch x heads; larger products are chunked over batch.
_MAX_GRID_Y = 65535


# --------------------------------------------------------------------------- kernels

@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 operands as raw uint16 bits (Triton 3.9), so
    # interpreted bf16 dots take fp32 copies of the (already bf16-rounded) operands instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _dot_acc(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_rs, v_rs, offs_m, offs_d, m_len,
               lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one segment.

    MASK: this range holds the causal diagonal or the ragged key tail, so
    loads and scores are masked; the bulk of the range runs unmasked.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        k_ptrs = k_base + (rows * k_rs)[:, None] + offs_d[None, :]
        v_ptrs = v_base + (rows * v_rs)[:, None] + offs_d[None, :]
        if MASK:
            kv_ok = offs_n < m_len
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        if MASK:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(ok, qk, float("-inf"))
        # Every processed block leaves each real row at least one finite score
        # (see the callers), so m_ij is finite and no inf - inf arises.
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _program_rows(n_blk, BLOCK: tl.constexpr, N, H, W, R, PH):
    """This program's block of kept rows: (start, m_len, b64, h64, row0, r64).

    The kept-rows rule of :mod:`longnet.patterns` on the device (device code
    cannot call the host functions): program (i, bh) takes block ``i % n_blk``
    (its first kept-row index is ``start``) of segment ``i // n_blk`` in head
    h = bh % H of batch item b = bh // H; the head offset is s = h mod R
    (``head_offset``), the segment keeps m_len = ``kept_count(seg_len, s, R)``
    rows, the first at position row0 = segment start + s, then every R-th.
    With a phase PH > 0 (clipped, PH <= W), segment 0 is [0, PH) and segment
    j >= 1 starts at PH + (j - 1) * W (``segment_groups``).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    seg = pid // n_blk
    start = (pid % n_blk) * BLOCK
    h = bh % H
    s = h % R
    # PH, W or N may arrive as constexprs (Triton specialises some int values): widen via a
    # tensor, in 64 bits since PH + (j + 1) * W may pass 2^31 near the end of a long sequence.
    ph = (s * 0 + PH).to(tl.int64)
    grid_seg = seg - (ph > 0).to(tl.int64)  # index on the grid PH + j * W; -1 for the leading segment
    seg_start = tl.maximum(ph + grid_seg * W, 0)
    seg_len = (tl.minimum(ph + (grid_seg + 1) * W, N) - seg_start).to(tl.int32)
    # Kept rows s, s + R, ... below seg_len (0 when s >= seg_len, as s < R).
    m_len = (seg_len - s + R - 1) // R
    row0 = seg_start + s
    # R may arrive as a constexpr (Triton specialises some int values), so widen via a tensor.
    r64 = (s * 0 + R).to(tl.int64)
    return start, m_len, (bh // H).to(tl.int64), h.to(tl.int64), row0, r64


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
                s_ob, s_on, s_oh, s_lb, s_ln, s_lh,
                N, H, W, R, PH, n_blk, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, MERGE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    start_m, m_len, b64, h64, row0, r64 = _program_rows(n_blk, BLOCK_M, N, H, W, R, PH)
    if start_m >= m_len:
        return
    q_base = Q + b64 * s_qb + h64 * s_qh + row0 * s_qn
    k_base = K + b64 * s_kb + h64 * s_kh + row0 * s_kn
    v_base = V + b64 * s_vb + h64 * s_vh + row0 * s_vn
    q_rs = r64 * s_qn
    k_rs = r64 * s_kn
    v_rs = r64 * s_vn

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < m_len
    rows_m = offs_m.to(tl.int64)
    q = tl.load(q_base + (rows_m * q_rs)[:, None] + offs_d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Keys below start_m are all visible and all exist; the diagonal block
        # [start_m, start_m + BLOCK_M) gives every row its own key first.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_rs, v_rs, offs_m, offs_d,
                                   m_len, 0, start_m, qk_scale, BLOCK_N, False, True, DOT_PREC, UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_rs, v_rs, offs_m, offs_d,
                                   m_len, start_m, tl.minimum(start_m + BLOCK_M, m_len), qk_scale,
                                   BLOCK_N, True, True, DOT_PREC, UPCAST)
    else:
        full = (m_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_rs, v_rs, offs_m, offs_d,
                                   m_len, 0, full, qk_scale, BLOCK_N, False, False, DOT_PREC, UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_rs, v_rs, offs_m, offs_d,
                                   m_len, full, m_len, qk_scale, BLOCK_N, True, False, DOT_PREC, UPCAST)

    # Rows past m_len hold junk (never stored); keep their l_i away from 0.
    l_i = tl.where(m_ok, l_i, 1.0)
    m_i = tl.where(m_ok, m_i, 0.0)
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural log
    o = acc / l_i[:, None]

    o_ptrs = O + b64 * s_ob + h64 * s_oh + row0 * s_on + (rows_m * (r64 * s_on))[:, None] \
        + offs_d[None, :]
    l_ptrs = LSE + b64 * s_lb + h64 * s_lh + row0 * s_ln + rows_m * (r64 * s_ln)
    if MERGE:
        # Stable exact merge with what earlier patterns left (0, -inf if none).
        lse_prev = tl.load(l_ptrs, mask=m_ok, other=0.0)
        o_prev = tl.load(o_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        mx = tl.maximum(lse_prev, lse)  # finite: lse is
        e_prev = tl.exp(lse_prev - mx)
        e_new = tl.exp(lse - mx)
        tot = e_prev + e_new
        o = (o_prev * e_prev[:, None] + o * e_new[:, None]) / tot[:, None]
        lse = mx + tl.log(tot)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(l_ptrs, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, n_rows,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dlse over contiguous (rows, D) views, in fp32."""
    # 64-bit before the multiply: B*N*H rows may pass 2^31.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_rows
    rows = offs
    d = tl.arange(0, HEAD_DIM)
    ptrs = (rows * HEAD_DIM)[:, None] + d[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, q_rs, do_rs, l_rs,
                    offs_n, offs_d, m_len, lo, hi, qk_scale,
                    BLOCK_M: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dk, dv of one key block over query blocks [lo, hi).

    Query rows past m_len load as q = dO = 0 with lse = delta = 0, so they
    add exactly 0; only the causal diagonal needs a score mask.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ok = offs_m < m_len
        rows = offs_m.to(tl.int64)
        q = tl.load(q_base + (rows * q_rs)[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(do_base + (rows * do_rs)[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        lse2 = tl.load(l_base + rows * l_rs, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(d_base + rows * l_rs, mask=ok, other=0.0)
        s_t = _dot(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = _dot_acc(p_t.to(do.dtype), do, dv, DOT_PREC, UPCAST)
        dp_t = _dot(v, tl.trans(do), DOT_PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot_acc(ds_t.to(q.dtype), q, dk, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
                     s_ob, s_on, s_oh, s_gb, s_gn, s_gh, s_lb, s_ln, s_lh,
                     N, H, W, R, PH, n_blk, scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, ACCUM: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    start_n, m_len, b64, h64, row0, r64 = _program_rows(n_blk, BLOCK_N, N, H, W, R, PH)
    if start_n >= m_len:
        return
    q_base = Q + b64 * s_qb + h64 * s_qh + row0 * s_qn
    k_base = K + b64 * s_kb + h64 * s_kh + row0 * s_kn
    v_base = V + b64 * s_vb + h64 * s_vh + row0 * s_vn
    do_base = DO + b64 * s_ob + h64 * s_oh + row0 * s_on
    l_base = LSE + b64 * s_lb + h64 * s_lh + row0 * s_ln
    d_base = DELTA + b64 * s_lb + h64 * s_lh + row0 * s_ln

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < m_len
    rows_n = offs_n.to(tl.int64)
    k = tl.load(k_base + (rows_n * (r64 * s_kn))[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(v_base + (rows_n * (r64 * s_vn))[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Queries below start_n see none of these keys; the diagonal band is masked.
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, r64 * s_qn, r64 * s_on,
                                 r64 * s_ln, offs_n, offs_d, m_len, start_n,
                                 tl.minimum(start_n + BLOCK_N, m_len), qk_scale, BLOCK_M, True, DOT_PREC,
                                 UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, r64 * s_qn, r64 * s_on,
                                 r64 * s_ln, offs_n, offs_d, m_len, start_n + BLOCK_N, m_len, qk_scale,
                                 BLOCK_M, False, DOT_PREC, UPCAST)
    else:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, r64 * s_qn, r64 * s_on,
                                 r64 * s_ln, offs_n, offs_d, m_len, 0, m_len, qk_scale, BLOCK_M, False,
                                 DOT_PREC, UPCAST)
    dk = dk * scale
    g_off = b64 * s_gb + h64 * s_gh + row0 * s_gn + (rows_n * (r64 * s_gn))[:, None] + offs_d[None, :]
    if ACCUM:
        dk += tl.load(DK + g_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        dv += tl.load(DV + g_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_rs, v_rs, offs_m, offs_d, m_len,
                  lo, hi, qk_scale,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dq of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        k_ptrs = k_base + (rows * k_rs)[:, None] + offs_d[None, :]
        v_ptrs = v_base + (rows * v_rs)[:, None] + offs_d[None, :]
        if MASK:
            kv_ok = offs_n < m_len
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s_ = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        p = tl.math.exp2(s_ - lse2[:, None])
        if MASK:
            # Missing keys must give p = 0 exactly: exp(0 - lse) may overflow.
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
                   s_ob, s_on, s_oh, s_gb, s_gn, s_gh, s_lb, s_ln, s_lh,
                   N, H, W, R, PH, n_blk, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, ACCUM: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    start_m, m_len, b64, h64, row0, r64 = _program_rows(n_blk, BLOCK_M, N, H, W, R, PH)
    if start_m >= m_len:
        return
    k_base = K + b64 * s_kb + h64 * s_kh + row0 * s_kn
    v_base = V + b64 * s_vb + h64 * s_vh + row0 * s_vn

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < m_len
    rows_m = offs_m.to(tl.int64)
    q = tl.load(Q + b64 * s_qb + h64 * s_qh + row0 * s_qn + (rows_m * (r64 * s_qn))[:, None]
                + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * s_ob + h64 * s_oh + row0 * s_on + (rows_m * (r64 * s_on))[:, None]
                 + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    l_off = b64 * s_lb + h64 * s_lh + row0 * s_ln + rows_m * (r64 * s_ln)
    lse2 = tl.load(LSE + l_off, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, r64 * s_kn, r64 * s_vn, offs_m, offs_d,
                           m_len, 0, start_m, qk_scale, BLOCK_N, False, True, DOT_PREC, UPCAST)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, r64 * s_kn, r64 * s_vn, offs_m, offs_d,
                           m_len, start_m, tl.minimum(start_m + BLOCK_M, m_len), qk_scale, BLOCK_N, True,
                           True, DOT_PREC, UPCAST)
    else:
        full = (m_len // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, r64 * s_kn, r64 * s_vn, offs_m, offs_d,
                           m_len, 0, full, qk_scale, BLOCK_N, False, False, DOT_PREC, UPCAST)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, r64 * s_kn, r64 * s_vn, offs_m, offs_d,
                           m_len, full, m_len, qk_scale, BLOCK_N, True, False, DOT_PREC, UPCAST)
    dq = dq * scale
    g_off = b64 * s_gb + h64 * s_gh + row0 * s_gn + (rows_m * (r64 * s_gn))[:, None] + offs_d[None, :]
    if ACCUM:
        dq += tl.load(DQ + g_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


# --------------------------------------------------------------------------- launch configuration

@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options, each (outer block, inner block, num_warps, num_stages).

    fwd: (BLOCK_M queries, BLOCK_N keys); dkdv: (BLOCK_N keys, BLOCK_M
    queries); dq: (BLOCK_M queries, BLOCK_N keys). The inner block must
    divide the outer one (the causal diagonal is walked in inner steps).
    """

    fwd: Tuple[int, int, int, int]
    dkdv: Tuple[int, int, int, int]
    dq: Tuple[int, int, int, int]

    def __post_init__(self) -> None:
        for name in ("fwd", "dkdv", "dq"):
            t = tuple(int(x) for x in getattr(self, name))
            if len(t) != 4:
                raise ValueError(f"BlockConfig.{name} must be (outer, inner, num_warps, num_stages), got {t}")
            outer, inner = t[0], t[1]
            for x in (outer, inner):
                if x < 16 or x & (x - 1):
                    raise ValueError(f"BlockConfig.{name} blocks must be powers of two >= 16, got {t}")
            if outer % inner:
                raise ValueError(f"BlockConfig.{name}: inner block {inner} must divide outer block {outer}")
            object.__setattr__(self, name, t)


def parse_config(spec: str) -> BlockConfig:
    """A BlockConfig from "fwd_m,fwd_n,w,s;dkdv_n,dkdv_m,w,s;dq_m,dq_n,w,s"."""
    parts = [tuple(int(x) for x in p.split(",")) for p in spec.split(";")]
    if len(parts) != 3:
        raise ValueError(f"LONGNET_TRITON_CONFIG must hold three ';'-separated 4-tuples, got {spec!r}")
    return BlockConfig(*parts)


def _env_config() -> Optional[BlockConfig]:
    # LONGNET_TRITON_CONFIG (parse_config's format), for tuning sweeps.
    spec = os.environ.get("LONGNET_TRITON_CONFIG")
    return parse_config(spec) if spec else None


def default_config(head_dim: int, capability: Optional[Tuple[int, int]] = None) -> BlockConfig:
    """Tiles for a GPU run at ``head_dim`` on a GPU of ``capability`` (None: sm90).

    Chosen offline (no GPU at hand) as the largest tiles that ptxas compiles for
    sm_80 and sm_90a without register spills and within the shared memory of an
    A100 / H100 (checked by tests/test_triton_compile.py); to be confirmed by
    timing with the benchmark's ``--sweep``.
    """
    if INTERPRET:
        # Small tiles: the interpreter is slow, and tiny test segments still span several blocks.
        return BlockConfig(fwd=(32, 16, 1, 1), dkdv=(32, 16, 1, 1), dq=(32, 16, 1, 1))
    if head_dim <= 32:
        return BlockConfig(fwd=(128, 64, 8, 3), dkdv=(128, 32, 8, 3), dq=(128, 32, 4, 3))
    if head_dim <= 64:
        return BlockConfig(fwd=(128, 64, 8, 3), dkdv=(128, 32, 8, 3), dq=(128, 32, 8, 3))
    # D = 128: 128 query rows per dq program (a quarter of the K/V re-reads of 32, and Hopper's
    # wgmma needs >= 64); on sm_80 the fwd 128 x 64 tile spills and the dq tile fits at 2 stages.
    if capability is not None and capability < (9, 0):
        return BlockConfig(fwd=(128, 32, 8, 2), dkdv=(64, 32, 8, 2), dq=(128, 32, 8, 2))
    return BlockConfig(fwd=(128, 64, 8, 2), dkdv=(64, 32, 8, 2), dq=(128, 32, 8, 3))


def _capability(q: Tensor) -> Optional[Tuple[int, int]]:
    return kernels.cuda_capability(q.device) if q.device.type == "cuda" and not INTERPRET else None


def _on_device(fn):
    """Run ``fn(x, ...)`` with x's GPU as the current device: Triton launches on the current device."""
    @functools.wraps(fn)
    def guarded(x, *args, **kwargs):
        if x.device.type != "cuda" or INTERPRET:
            return fn(x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(x, *args, **kwargs)
    return guarded


def _fit(block: Tuple[int, int, int, int], kept: int) -> Tuple[int, int, int, int]:
    """Shrink tiles to a short segment's kept-row count (never below 16)."""
    outer, inner, warps, stages = block
    cap = max(16, triton.next_power_of_2(kept))
    outer = min(outer, cap)
    inner = min(inner, outer)
    return outer, inner, warps, stages


# --------------------------------------------------------------------------- host side

def why_not(q: Tensor) -> Optional[str]:
    """Why ``backend="triton"`` cannot run q (B, N, H, D), or None when it can."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"it needs head dim D in {SUPPORTED_HEAD_DIMS}, got D={d}"
    if q.device.type == "cuda" and not INTERPRET:
        if q.dtype not in _GPU_DTYPES:
            return f"it needs float16 or bfloat16 on CUDA, got {q.dtype}"
        cap = kernels.cuda_capability(q.device)
        if cap < MIN_CAPABILITY:
            return (f"it needs a GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                    f"(bfloat16 tensor-core dots), got {cap[0]}.{cap[1]} on {q.device}")
        return None
    if not INTERPRET:
        return (f"it runs on CUDA tensors, got a tensor on {q.device}. To run the kernels on CPU "
                "(slowly, for testing) set TRITON_INTERPRET=1 before importing triton/longnet")
    if q.device.type not in ("cpu", "cuda"):
        return f"the interpreter runs cpu tensors, got a tensor on {q.device}"
    if q.dtype not in _INTERP_DTYPES:
        return f"it needs float16, bfloat16 or float32, got {q.dtype}"
    return None


def supports(q: Tensor) -> bool:
    """Whether ``backend="triton"`` can run q (B, N, H, D)'s dtype, device and head dim."""
    return why_not(q) is None


def _check_runnable(q: Tensor) -> None:
    reason = why_not(q)
    if reason is not None:
        raise ValueError(f"the triton backend cannot run this input: {reason}")


def _order(segment_lengths: Sequence[int], dilation_rates: Sequence[int], n: int,
           segment_phases: Optional[Sequence[int]] = None):
    """(w, r, φ) with w and φ clipped to N, the r = 1 patterns first (they may start the merge by storing)."""
    phases = segment_phases or (0,) * len(segment_lengths)
    pats = [(clip_segment(w, n), r, clip_phase(phi, n)) for w, r, phi in zip(segment_lengths, dilation_rates, phases)]
    return sorted(pats, key=lambda p: p[1] != 1)


def _most_kept(w: int, r: int) -> int:
    """The most rows any head keeps in a segment of w: offset 0 keeps the most."""
    return kept_count(w, 0, r)


def _grid(n: int, w: int, r: int, phase: int, block: int, bh: int) -> Tuple[int, int, int]:
    nseg = sum(count for _, count, _ in segment_groups(n, w, phase))
    n_blk = -(-_most_kept(w, r) // block)
    return nseg * n_blk, bh, n_blk


def _batch_chunks(b: int, h: int):
    step = max(1, _MAX_GRID_Y // h)
    for b0 in range(0, b, step):
        yield b0, min(b, b0 + step)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE dots (tf32 would break the fp32 comparison); others ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


@_on_device
def _forward(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, causal: bool, scale: float,
             config: Optional[BlockConfig] = None, segment_phases=None) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D) in q's dtype, lse (B, N, H) fp32) of the mixture; no autograd."""
    b, n, h, d = q.shape
    config = config or _env_config() or default_config(d, _capability(q))
    pats = _order(segment_lengths, dilation_rates, n, segment_phases)
    single = len(pats) == 1
    store_first = pats[0][1] == 1
    # One pattern writes the final dtype directly; a mixture merges in fp32.
    acc = acc_dtype(q.dtype)  # float32: the kernels take no float64
    alloc = torch.empty if store_first else torch.zeros
    out = alloc((b, n, h, d), dtype=q.dtype if single else acc, device=q.device)
    lse = torch.empty((b, n, h), dtype=acc, device=q.device) if store_first else \
        torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device)
    qk_scale = scale * _LOG2E
    prec = _dot_precision(q.dtype)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    for i, (w, r, phi) in enumerate(pats):
        bm, bn, warps, stages = _fit(config.fwd, _most_kept(w, r))
        merge = not (i == 0 and store_first)
        for b0, b1 in _batch_chunks(b, h):
            qs, ks, vs, os_, ls = q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], lse[b0:b1]
            g0, g1, n_blk = _grid(n, w, r, phi, bm, (b1 - b0) * h)
            _fwd_kernel[(g0, g1)](
                qs, ks, vs, os_, ls,
                *qs.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], *os_.stride()[:3], *ls.stride(),
                n, h, w, r, phi, n_blk, qk_scale,
                HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, MERGE=merge, DOT_PREC=prec, UPCAST=upcast,
                num_warps=warps, num_stages=stages)
    return out.to(q.dtype), lse


@_on_device
def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
              segment_lengths, dilation_rates, causal: bool, scale: float,
              config: Optional[BlockConfig] = None, segment_phases=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (dq, dk, dv) of the mixture, given the merged out and lse (and optionally dlse)."""
    b, n, h, d = q.shape
    config = config or _env_config() or default_config(d, _capability(q))
    do = do.contiguous()
    out = out.contiguous()
    delta = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    rows = b * n * h
    blk = PREPROCESS_ROWS
    dl = dlse.contiguous().to(torch.float32) if dlse is not None else delta
    _bwd_preprocess[(triton.cdiv(rows, blk),)](out, do, dl, delta, rows, HEAD_DIM=d, BLOCK=blk,
                                               HAS_DLSE=dlse is not None)
    lse = lse.contiguous()

    pats = _order(segment_lengths, dilation_rates, n, segment_phases)
    single = len(pats) == 1
    store_first = pats[0][1] == 1
    alloc = torch.empty if store_first else torch.zeros
    dq, dk, dv = (alloc((b, n, h, d), dtype=q.dtype if single else acc_dtype(q.dtype), device=q.device)
                  for _ in range(3))
    qk_scale = scale * _LOG2E
    prec = _dot_precision(q.dtype)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    for i, (w, r, phi) in enumerate(pats):
        accum = not (i == 0 and store_first)
        kept = _most_kept(w, r)
        bn1, bm1, warps1, stages1 = _fit(config.dkdv, kept)
        bm2, bn2, warps2, stages2 = _fit(config.dq, kept)
        for b0, b1 in _batch_chunks(b, h):
            qs, ks, vs, dos = q[b0:b1], k[b0:b1], v[b0:b1], do[b0:b1]
            ls, ds_ = lse[b0:b1], delta[b0:b1]
            dqs, dks, dvs = dq[b0:b1], dk[b0:b1], dv[b0:b1]
            common = (*qs.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], *dos.stride()[:3],
                      *dks.stride()[:3], *ls.stride())
            g0, g1, n_blk = _grid(n, w, r, phi, bn1, (b1 - b0) * h)
            _bwd_dkdv_kernel[(g0, g1)](
                qs, ks, vs, dos, ls, ds_, dks, dvs, *common, n, h, w, r, phi, n_blk, scale, qk_scale,
                HEAD_DIM=d, BLOCK_M=bm1, BLOCK_N=bn1, CAUSAL=causal, ACCUM=accum, DOT_PREC=prec, UPCAST=upcast,
                num_warps=warps1, num_stages=stages1)
            g0, g1, n_blk = _grid(n, w, r, phi, bm2, (b1 - b0) * h)
            _bwd_dq_kernel[(g0, g1)](
                qs, ks, vs, dos, ls, ds_, dqs, *common, n, h, w, r, phi, n_blk, scale, qk_scale,
                HEAD_DIM=d, BLOCK_M=bm2, BLOCK_N=bn2, CAUSAL=causal, ACCUM=accum, DOT_PREC=prec, UPCAST=upcast,
                num_warps=warps2, num_stages=stages2)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _TritonDilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_lengths, dilation_rates, causal, scale, segment_phases):
        out, lse = _forward(q, k, v, segment_lengths, dilation_rates, causal, scale,
                            segment_phases=segment_phases)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (segment_lengths, dilation_rates, causal, scale, segment_phases)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        segment_lengths, dilation_rates, causal, scale, segment_phases = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout, q, k, v, out, lse, dlse, segment_lengths, dilation_rates, causal, scale,
                               segment_phases=segment_phases)
        return dq, dk, dv, None, None, None, None, None


def dilated_attention_triton(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, *,
                             is_causal: bool = False, scale: Optional[float] = None,
                             segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse (B, N, H) fp32) of docs/design.md §2 with the fused kernels; differentiable.

    Call it through ``longnet.dilated_attention(..., backend="triton")``, which
    validates the arguments (``segment_phases`` included; None means all 0).
    """
    _check_runnable(q)
    if scale is None:
        scale = default_scale(q.shape[-1])
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    phases = tuple(segment_phases) if segment_phases is not None else None
    return _TritonDilatedAttentionFn.apply(q, k, v, tuple(segment_lengths), tuple(dilation_rates),
                                           bool(is_causal), float(scale), phases)


def backend_fn(q, k, v, w, r, *, is_causal, scale, segment_phases=None):
    """The registry's entry point (see :mod:`longnet.backends.registry`)."""
    return dilated_attention_triton(q, k, v, w, r, is_causal=is_causal, scale=scale,
                                    segment_phases=segment_phases)
