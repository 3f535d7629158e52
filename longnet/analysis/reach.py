"""How many stacked dilated-attention layers connect two tokens (docs/design.md §3, "Path length").

One layer lets token j influence token i iff ``C_h[i, j] > 0`` for some head h
(docs/design.md §2): i and j share a segment of some pattern (w, r) and are both kept
by a head of that pattern (offset ``h mod r``), with ``j <= i`` when causal.
Residual connections keep what a token already had, so the reach after L
layers is every path of at most L edges, and the *depth* of a pair is its
shortest-path length in the union-of-heads graph (0 for i == j).

The graph is a union of cliques, one per (pattern, used offset, segment):
the kept rows ``a + s, a + s + r, ...`` of one segment. One BFS step is
therefore an OR-reduction over each clique (an OR-prefix-scan when causal,
since a row reaches only later rows of its clique), done on strided views of
the position axis. Sources run 64 at a time as bits of uint64 words, so the
all-pairs BFS costs about ``N**2 / 64 * K * depth`` word operations and never
builds an N x N matrix.

Blind spots it flags:

* rows kept by no pattern in any head ("dead rows", e.g. when r > H leaves
  offsets unused and no other pattern covers them);
* blocks that never talk: no segment crosses a multiple of ``lcm(w)``, so
  when ``lcm(w) < N`` tokens in different such blocks are never connected,
  however many layers are stacked (the largest segment must reach N for the
  O(log N) claim to hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import numpy as np

from .. import patterns as _patterns
from ..checks import check_int
from ..patterns import DilatedPattern, validate_pattern

__all__ = [
    "ReachResult",
    "dead_rows",
    "depth_matrix",
    "depth_vs_n",
    "paper_depth_estimate",
    "reach",
    "used_offsets",
]


def _check_n_heads(n, num_heads) -> Tuple[int, int]:
    for name, val in (("n", n), ("num_heads", num_heads)):
        check_int(name, val)
    return int(n), int(num_heads)


def _wr(pattern) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """(segment_lengths, dilation_rates, segment_phases) of a DilatedPattern or a (w, r) pair."""
    if isinstance(pattern, DilatedPattern):
        return pattern.segment_lengths, pattern.dilation_rates, pattern.segment_phases
    if isinstance(pattern, tuple) and len(pattern) == 2:
        w_t, r_t = validate_pattern(*pattern)
        return w_t, r_t, (0,) * len(w_t)
    raise TypeError("pattern must be a DilatedPattern or a (segment_lengths, dilation_rates) pair, "
                    f"got {type(pattern).__name__}")


def used_offsets(dilation_rate: int, num_heads: int) -> List[int]:
    """Offsets ``h mod r`` that some head uses; all of 0..r-1 only when H >= r."""
    return list(_patterns.used_offsets(dilation_rate, num_heads))


def dead_rows(pattern, n: int, num_heads: int) -> np.ndarray:
    """Positions kept by no pattern in any head, as a sorted int64 array.

    Such a row neither sends nor receives anything in any layer.
    """
    n, num_heads = _check_n_heads(n, num_heads)
    w_t, r_t, phi_t = _wr(pattern)
    pos = np.arange(n)
    kept = np.zeros(n, dtype=bool)
    for w, r, phi in zip(w_t, r_t, phi_t):
        kept |= np.isin(_patterns.row_offset(pos, w, r, phi), used_offsets(r, num_heads))
    return np.flatnonzero(~kept)


def paper_depth_estimate(n: float, base_segment: float, alpha: float) -> float:
    """The paper's layer count to span N tokens: ``log_alpha(N (alpha - 1) / w0)``.

    It comes from the attentive field of l layers, ``sum_{i<l} w0 alpha^i =
    w0 (alpha^l - 1) / (alpha - 1)``, set equal to N (the -1 dropped).
    """
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    if base_segment <= 0 or n <= 0:
        raise ValueError(f"n and base_segment must be positive, got n={n}, base_segment={base_segment}")
    return math.log(n * (alpha - 1) / base_segment, alpha)


# --------------------------------------------------------------------------- BFS core

def _popcount(a: np.ndarray) -> int:
    if a.dtype == np.bool_:
        return int(a.sum())
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(a).sum(dtype=np.int64))
    return int(np.unpackbits(np.ascontiguousarray(a).view(np.uint8)).sum(dtype=np.int64))


def _cliques(w_t, r_t, phi_t, n: int, num_heads: int):
    """(segment groups, r, offsets, all_offsets) per pattern; groups as in patterns.segment_groups."""
    out = []
    for w, r, phi in zip(w_t, r_t, phi_t):
        offs = used_offsets(r, num_heads)
        out.append((_patterns.segment_groups(n, w, phi), r, offs, len(offs) == r))
    return out


def _step(x: np.ndarray, cliques, causal: bool) -> np.ndarray:
    """One layer: y[i] = x[i] | OR of x[j] over every clique holding i (j <= i when causal).

    x: (n, words) of uint64 source bits, or (n, n_src) bool. Views only; one copy for y.
    """
    y = x.copy()
    orr = np.bitwise_or

    def spread(xv, yv, axis):
        if causal:
            yv |= orr.accumulate(xv, axis=axis)
        else:
            yv |= orr.reduce(xv, axis=axis, keepdims=True)

    for groups, r, offs, all_offs in cliques:
        for start, count, w in groups:  # `count` segments of length w from `start`
            xs = x[start:start + count * w].reshape(count, w, -1)
            ys = y[start:start + count * w].reshape(count, w, -1)
            if all_offs and w % r == 0:
                # Every offset used: all cliques of a segment are the columns of (w/r, r).
                spread(xs.reshape(count, w // r, r, -1), ys.reshape(count, w // r, r, -1), axis=1)
            else:
                for s in offs:
                    if s < w:
                        spread(xs[:, s::r], ys[:, s::r], axis=1)
    return y


def _bfs_bits(n: int, cliques, causal: bool, src_lo: int, src_hi: int, max_steps: int):
    """All-pairs BFS for sources src_lo..src_hi-1 packed as uint64 bits.

    Returns (hist, witness, reached_pairs): hist[d-1] = pairs first reached
    at depth d, witness = (source, target) of one pair at the deepest depth.
    """
    count = src_hi - src_lo
    words = (count + 63) // 64
    x = np.zeros((n, words), dtype=np.uint64)
    t = np.arange(count)
    x[src_lo + t, t // 64] = np.left_shift(np.uint64(1), (t % 64).astype(np.uint64))
    hist: List[int] = []
    witness = None
    for _ in range(max_steps):
        y = _step(x, cliques, causal)
        new = y & ~x
        c = _popcount(new)
        if c == 0:
            break
        hist.append(c)
        i, wd = np.argwhere(new)[0]
        bit = int(new[i, wd]).bit_length() - 1
        witness = (src_lo + int(wd) * 64 + bit, int(i))
        x = y
    reached = _popcount(x) - count  # minus the self bits
    return hist, witness, reached


# --------------------------------------------------------------------------- public API

@dataclass
class ReachResult:
    """All-pairs reach of one pattern mixture at length N.

    Pairs are ordered (j -> i), j != i; when causal only j < i count, since a
    later token can never influence an earlier one.
    """

    n: int
    num_heads: int
    causal: bool
    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    segment_phases: Tuple[int, ...]
    max_depth: Optional[int]          # deepest shortest path over connected pairs; None if none
    witness: Optional[Tuple[int, int]]  # (j, i) at max_depth
    depth_histogram: List[int]        # [d-1] = number of pairs at depth d
    pairs: int                        # pairs considered
    never_connected: int              # pairs with no path at any depth
    dead_rows: np.ndarray = field(repr=False)
    block_length: Optional[int] = None  # lcm(w) when < N: blocks that never talk
    paper_estimate: Optional[float] = None

    @property
    def connected(self) -> bool:
        return self.never_connected == 0

    def summary(self) -> str:
        mode = "causal" if self.causal else "non-causal"
        lines = [f"reach ({mode}, N={self.n}, H={self.num_heads}): "
                 + (f"max depth {self.max_depth} layers, e.g. token {self.witness[0]} -> {self.witness[1]}"
                    if self.max_depth is not None else "no pair is connected")]
        if self.paper_estimate is not None:
            lines.append(f"  paper estimate log_a(N(a-1)/w0) = {self.paper_estimate:.2f}")
        if self.depth_histogram:
            lines.append("  pairs per depth: " + ", ".join(
                f"{d + 1}:{c}" for d, c in enumerate(self.depth_histogram)))
        if self.never_connected:
            lines.append(f"  WARNING: {self.never_connected} of {self.pairs} pairs "
                         f"({100 * self.never_connected / self.pairs:.2f}%) are never connected")
            if len(self.dead_rows):
                shown = ", ".join(map(str, self.dead_rows[:10])) + (" ..." if len(self.dead_rows) > 10 else "")
                lines.append(f"  {len(self.dead_rows)} rows are kept by no pattern in any head: {shown}")
            if self.block_length is not None:
                lines.append(f"  no segment crosses a multiple of lcm(w) = {self.block_length} < N: "
                             "tokens in different blocks never interact")
        else:
            lines.append("  every pair is connected")
        return "\n".join(lines)


def _estimate_for(w_t, r_t, n) -> Optional[float]:
    w0 = w_t[0]
    alpha = (w_t[-1] / w0) ** (1 / (len(w_t) - 1)) if len(w_t) > 1 else 2.0
    if alpha <= 1:
        return None
    return paper_depth_estimate(n, w0, alpha)


def reach(pattern, n: int, num_heads: int, *, causal: bool = False,
          batch_sources: int = 4096) -> ReachResult:
    """Exact all-pairs reach of ``pattern`` at length ``n`` with ``num_heads`` heads.

    ``pattern`` is a :class:`DilatedPattern` or a ``(segment_lengths,
    dilation_rates)`` pair. Cost is about ``N**2/64 * K * depth`` word
    operations (memory ``N * batch_sources / 8`` bytes), so N = 16384 takes
    seconds and N = 65536 minutes on one core.
    """
    n, num_heads = _check_n_heads(n, num_heads)
    check_int("batch_sources", batch_sources)
    w_t, r_t, phi_t = _wr(pattern)
    lcm = math.lcm(*w_t)
    # No segment straddles a multiple of lcm(w), and translating by it maps segments and
    # offsets onto themselves: the graph is copies of one block plus a tail block.
    # (Not with phases: a shifted segment may straddle it.)
    if lcm < n and not any(phi_t):
        blocks = [(lcm, n // lcm, 0)] + ([(n % lcm, 1, n - n % lcm)] if n % lcm else [])
    else:
        blocks = [(n, 1, 0)]
    hist: List[int] = []
    witness = None
    reached = 0
    for length, copies, start in blocks:  # full blocks report pairs in their first copy
        cl = _cliques(w_t, r_t, phi_t, length, num_heads)
        for lo in range(0, length, batch_sources):
            h, wit, r = _bfs_bits(length, cl, causal, lo, min(lo + batch_sources, length), max_steps=length)
            if len(h) > len(hist):
                witness = (wit[0] + start, wit[1] + start)
            for d, c in enumerate(h):
                if d >= len(hist):
                    hist.append(0)
                hist[d] += c * copies
            reached += r * copies
    pairs = n * (n - 1) // (2 if causal else 1)
    return ReachResult(
        n=n, num_heads=num_heads, causal=causal, segment_lengths=w_t, dilation_rates=r_t, segment_phases=phi_t,
        max_depth=len(hist) if hist else None, witness=witness, depth_histogram=hist,
        pairs=pairs, never_connected=pairs - reached, dead_rows=dead_rows(pattern, n, num_heads),
        block_length=lcm if lcm < n and not any(phi_t) else None, paper_estimate=_estimate_for(w_t, r_t, n))


def depth_matrix(pattern, n: int, num_heads: int, *, causal: bool = False) -> np.ndarray:
    """(N, N) int32: ``D[i, j]`` = layers after which token j can influence token i; -1 = never.

    Dense, so for small N (N = 4096 is 64 MiB). ``D[i, i] = 0``.
    """
    n, num_heads = _check_n_heads(n, num_heads)
    cl = _cliques(*_wr(pattern), n, num_heads)
    x = np.eye(n, dtype=bool)  # x[i, j]: source j has reached position i
    d = np.where(x, 0, -1).astype(np.int32)
    for step in range(1, n + 1):
        y = _step(x, cl, causal)
        new = y & ~x
        if not new.any():
            break
        d[new] = step
        x = y
    return d


def depth_vs_n(base_segment: int, ns: Iterable[int], num_heads: Optional[int] = None, *,
               alpha: int = 2, base_rate: int = 1, causal: bool = False):
    """Max depth against N for geometric patterns whose largest segment covers N.

    For each N, the pattern is ``DilatedPattern.geometric(base_segment, k,
    alpha=alpha, base_rate=base_rate)`` with the fewest k such that
    ``w_max >= N``. ``num_heads=None`` uses ``H = r_max`` (every offset used).
    Returns a list of dicts: n, pattern, heads, max_depth, never_connected,
    paper_estimate.
    """
    rows = []
    for n in ns:
        n = int(n)
        k = 1
        while base_segment * alpha ** (k - 1) < n:
            k += 1
        pat = DilatedPattern.geometric(base_segment, k, alpha=alpha, base_rate=base_rate)
        heads = num_heads if num_heads is not None else max(pat.dilation_rates)
        res = reach(pat, n, heads, causal=causal)
        rows.append(dict(n=n, pattern=pat, heads=heads, max_depth=res.max_depth,
                         never_connected=res.never_connected,
                         paper_estimate=paper_depth_estimate(n, base_segment, alpha)))
    return rows
