"""Shared test utilities: the per-dtype tolerance table, a loop-over-segments oracle."""

import math
from typing import Tuple

import torch

from longnet.backends.numerics import TOLERANCE

# THE tolerance table of every backend's tests: (atol, rtol) per input dtype and quantity, for a
# backend's result against an exact float64 computation on the same (dtype-rounded) inputs ~ N(0, 1).
# "grad" is dq, dk, dv. Half types are also held to flash-attention's rule where a test says so:
# no more than about twice the error of a plain same-dtype PyTorch computation.
TOL = TOLERANCE  # one table for the tests and `longnet selftest`


def tol(dtype, kind: str = "out") -> Tuple[float, float]:
    """(atol, rtol) of ``kind`` ("out", "lse" or "grad") for inputs of ``dtype`` (a dtype or its name)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return TOL[dtype][kind]


def assert_close(actual, expected, dtype, kind: str = "out", msg=None) -> None:
    """``actual`` against ``expected`` (compared in float64) with the table's tolerance for dtype and kind."""
    atol, rtol = tol(dtype, kind)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg)


def tolerance_ratio(actual, expected, dtype, kind: str = "out") -> float:
    """max |actual - expected| / (atol + rtol |expected|): <= 1 is within the table (entries where
    expected is not finite are skipped)."""
    atol, rtol = tol(dtype, kind)
    a, e = actual.double(), expected.double()
    ok = torch.isfinite(e)
    if not ok.any():
        return 0.0
    return float(((a - e).abs() / (atol + rtol * e.abs()))[ok].max())


def _segments(n, w, phi):
    """[(a, e)] of positions 0..N-1 cut at 0, φ, φ + w, φ + 2w, ... (written out, no library rule)."""
    cuts = sorted({0, n} | set(range(phi, n, w)))
    return list(zip(cuts[:-1], cuts[1:]))


def loop_reference(q, k, v, segment_lengths, dilation_rates, *, is_causal=False, scale=None,
                   segment_phases=None):
    """docs/design.md §1-2 spelled out with Python loops: per pattern, head and segment, then merge.

    q, k, v: (B, N, H, D) float64. ``segment_phases`` shifts pattern i's segments to start at
    φ_i + k w_i (docs/design.md §2.1's opt-in variant). Returns (out, lse) like the op.
    """
    b, n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    partials = []  # per pattern: (out (B,N,H,D), lse (B,N,H))
    phases = segment_phases if segment_phases is not None else [0] * len(segment_lengths)
    for w, r, phi in zip(segment_lengths, dilation_rates, phases):
        o_i = torch.zeros_like(q)
        l_i = torch.full((b, n, h), -math.inf, dtype=q.dtype)
        for head in range(h):
            s = head % r
            for a, e in _segments(n, w, phi):
                rows = list(range(a + s, e, r))
                if not rows:
                    continue
                idx = torch.tensor(rows)
                qs, ks, vs = q[:, idx, head], k[:, idx, head], v[:, idx, head]
                sc = qs @ ks.transpose(-1, -2) * scale
                if is_causal:
                    mask = idx[None, :] > idx[:, None]
                    sc = sc.masked_fill(mask, -math.inf)
                lse = torch.logsumexp(sc, -1)
                o_i[:, idx, head] = torch.softmax(sc, -1) @ vs
                l_i[:, idx, head] = lse
        partials.append((o_i, l_i))
    lses = torch.stack([l for _, l in partials])
    lse = torch.logsumexp(lses, 0)
    out = torch.zeros_like(q)
    for o_i, l_i in partials:
        wgt = torch.exp(l_i - lse).nan_to_num(0.0)  # rows no pattern keeps: -inf - -inf
        out += wgt[..., None] * o_i
    return out, lse
