"""The band: a mixture's r = 1 patterns of short segments, computed together in one pass.

The local window (:meth:`longnet.DilatedPattern.with_local_window`) adds two r = 1 patterns
of w = 16 rows, phases 0 and 8. As segments they are many tiny kernel problems (and phased
groups that do not cover whole rows take one call per batch item); as what they are, a band
around the diagonal, they are one pass over the sequence.

Exactness. Merging patterns by lse (docs/design.md §7) computes, for the band's patterns
alone, o_i = sum_j c_ij e^{s_ij} v_j / sum_j c_ij e^{s_ij} and lse_i = log sum_j c_ij e^{s_ij},
where c_ij counts the band's patterns in which query i and key j share a segment (and j <= i
when causal): the merge of those patterns' (out, lse) is this one weighted softmax, so the
band's (out, lse) enter the merge with the other patterns in their place. Backward, each
pattern's flash backward at the mixture's merged (out, lse) adds
p_ij (dp_ij - delta_i) scale with p_ij = e^{s_ij - lse_i} over its own pairs; summed over the
band's patterns that is the same expression with p_ij = c_ij e^{s_ij - lse_i}. So results
equal today's mixture up to rounding, forward and backward.

Layouts: :func:`merge_into` and :func:`add_grads` take the op's (B, N, H, D) tensors (lse
(B, N, H)), any strides with a contiguous last dimension, and buffers in the accumulation dtype;
the math functions take (Z, H, L, D) and return fresh tensors in the accumulation dtype, laid out
(Z, L, H, D) in memory like the kernels' outputs.

Kernels: longnet's CPU kernel (:mod:`.cpu_flash`, ``band_fwd``/``band_bwd``, which merge into
and add to the mixture's buffers themselves) where it runs, the chunked math below with
``force_math`` (the math backend), and nowhere else: elsewhere (PyTorch's kernels, CUDA,
Triton) the patterns stay separate calls (:func:`split` returns None).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import clip_phase, clip_segment, segment_bounds, segment_start
from . import cpu_flash
from .numerics import acc_dtype

__all__ = ["MAX_SEGMENT", "Band", "split", "merge_into", "add_grads", "math_fwd", "math_bwd"]

# r = 1 patterns whose segments (clipped to N) are at most this long form the band: each query
# block then takes a few dozen keys beyond its own rows, against segments' own small problems.
MAX_SEGMENT = 64
# Query rows per chunk of the math path.
_MATH_CHUNK = 256


class Band(NamedTuple):
    """The band's patterns (windows and phases clipped to N) and the mixture's other patterns."""

    windows: Tuple[int, ...]
    phases: Tuple[int, ...]
    rest_lengths: Tuple[int, ...]
    rest_rates: Tuple[int, ...]
    rest_phases: Optional[Tuple[int, ...]]


def split(n: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
          segment_phases: Optional[Sequence[int]], q: Tensor, k: Tensor, force_math: bool) -> Optional[Band]:
    """The band of a mixture at length n for q, k (B, N, H, D), or None when no pattern belongs to
    it or no kernel computes it (see the module docstring).

    Its patterns: r = 1 and a segment of at most :data:`MAX_SEGMENT` rows once clipped to n.
    """
    if q.shape[1] != k.shape[1] or not (force_math or cpu_flash.band_wanted(q, k)):
        return None
    phases = tuple(segment_phases) if segment_phases is not None else (0,) * len(segment_lengths)
    inside = [r == 1 and clip_segment(w, n) <= MAX_SEGMENT for w, r in zip(segment_lengths, dilation_rates)]
    if not any(inside):
        return None
    pick = lambda seq, keep: tuple(x for x, i in zip(seq, inside) if i == keep)  # noqa: E731
    rest_phases = pick(phases, False)
    return Band(tuple(clip_segment(w, n) for w in pick(segment_lengths, True)),
                tuple(clip_phase(p, n) for p in pick(phases, True)),
                pick(segment_lengths, False), pick(dilation_rates, False),
                rest_phases if any(rest_phases) else None)


def _keys(i: int, j: int, n: int, band: Band, causal: bool) -> Tuple[int, int]:
    """[lo, hi): the keys some query in [i, j) sees."""
    lo = min(segment_bounds(i, n, w, p)[0] for w, p in zip(band.windows, band.phases))
    hi = max(segment_bounds(j - 1, n, w, p)[1] for w, p in zip(band.windows, band.phases))
    return lo, min(hi, j) if causal else hi


def _counts(i: int, j: int, lo: int, hi: int, band: Band, causal: bool, device) -> Tensor:
    """(j - i, hi - lo) int64: c for queries [i, j) and keys [lo, hi) (see the module docstring)."""
    rows = torch.arange(i, j, device=device)[:, None]
    cols = torch.arange(lo, hi, device=device)[None, :]
    c = sum((segment_start(rows, w, p) == segment_start(cols, w, p)).long()
            for w, p in zip(band.windows, band.phases))
    return c * (cols <= rows) if causal else c


def _empty_like_kernel(shape, dtype, device) -> Tensor:
    """A (Z, H, L, *rest) tensor laid out (Z, L, H, *rest) in memory, as the kernels return them."""
    z, h, l, *rest = shape
    return torch.empty((z, l, h, *rest), dtype=dtype, device=device).transpose(1, 2)


def math_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, band: Band) -> Tuple[Tensor, Tensor]:
    """Reference-quality (out, lse) of the band, computed in fp32/fp64 chunk by chunk of queries."""
    acc = acc_dtype(q.dtype)
    n = q.shape[-2]
    out = _empty_like_kernel(q.shape, acc, q.device)
    lse = _empty_like_kernel((*q.shape[:-1], 1), acc, q.device)[..., 0]
    for i in range(0, n, _MATH_CHUNK):
        j = min(i + _MATH_CHUNK, n)
        lo, hi = _keys(i, j, n, band, causal)
        c = _counts(i, j, lo, hi, band, causal, q.device)
        s = torch.matmul(q[..., i:j, :].to(acc), k[..., lo:hi, :].to(acc).transpose(-1, -2)) * scale
        s = torch.where(c > 0, s + c.clamp(min=1).to(acc).log(), float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        lse[..., i:j] = m
        out[..., i:j, :] = torch.matmul(torch.exp(s - m[..., None]), v[..., lo:hi, :].to(acc))
    return out, lse


def math_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
             band: Band) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the band at the (merged) out and lse, in fp32/fp64; see the module docstring."""
    acc = acc_dtype(q.dtype)
    n = q.shape[-2]
    dq = _empty_like_kernel(q.shape, acc, q.device)
    dk, dv = (_empty_like_kernel(q.shape, acc, q.device).zero_() for _ in range(2))
    for i in range(0, n, _MATH_CHUNK):
        j = min(i + _MATH_CHUNK, n)
        lo, hi = _keys(i, j, n, band, causal)
        c = _counts(i, j, lo, hi, band, causal, q.device).to(acc)
        qi, doi, kb, vb = q[..., i:j, :].to(acc), do[..., i:j, :].to(acc), k[..., lo:hi, :].to(acc), \
            v[..., lo:hi, :].to(acc)
        s = torch.matmul(qi, kb.transpose(-1, -2)) * scale
        # p <= 1 exactly (lse sums every score); the clamp keeps masked pairs (c = 0) from overflowing.
        p = c * torch.exp((s - lse[..., i:j, None].to(acc)).clamp(max=0))
        dv[..., lo:hi, :] += torch.matmul(p.transpose(-1, -2), doi)
        delta = (doi * out[..., i:j, :].to(acc)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(doi, vb.transpose(-1, -2)) - delta) * scale
        dq[..., i:j, :] = torch.matmul(ds, kb)
        dk[..., lo:hi, :] += torch.matmul(ds.transpose(-1, -2), qi)
    return dq, dk, dv


def merge_into(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, band: Band, force_math: bool,
               out: Optional[Tensor], lse: Optional[Tensor], merge: Callable) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse (B, N, H)): the band merged into the given buffers in place, or fresh
    ones when they are None, in the accumulation dtype. ``merge(out, lse, o, l)``: the op's merge
    of a partial in place (the math path's; the kernel merges itself)."""
    t = [x.transpose(1, 2) for x in (q, k, v)]
    if not force_math:
        views = None if out is None else (out.transpose(1, 2), lse.transpose(1, 2))
        o, l = cpu_flash.band_fwd(*t, causal, scale, band.windows, band.phases, *(views or ()))
        return o.transpose(1, 2), l.transpose(1, 2)
    o, l = (x.transpose(1, 2) for x in math_fwd(*t, causal, scale, band))
    if out is None:
        return o, l
    merge(out, lse, o, l)
    return out, lse


def add_grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
              band: Band, force_math: bool, grads: Optional[Sequence[Tensor]]) -> list:
    """(dq, dk, dv) (B, N, H, D): the band's share of the mixture's gradient at its merged out and
    lse, added into the given ``grads`` in place, or fresh ones when None, in the accumulation dtype."""
    t = [x.transpose(1, 2) for x in (do, q, k, v, out, lse)]
    if not force_math:
        given = None if grads is None else [g.transpose(1, 2) for g in grads]
        return [g.transpose(1, 2) for g in cpu_flash.band_bwd(*t, causal, scale, band.windows, band.phases, given)]
    parts = [g.transpose(1, 2) for g in math_bwd(*t, causal, scale, band)]
    if grads is None:
        return parts
    for g, p in zip(grads, parts):
        g.add_(p)
    return list(grads)
