"""Counting what a dilation pattern connects, without an N x N array.

* :func:`keep_masks` -- (K, H, N) rows kept by each pattern and head;
* :func:`block_count_matrix` -- C of docs/design.md §2 summed over b x b blocks, built
  from per-segment kept-row counts (``B = M^T M``), so N = 65536 costs about
  N/r work per pattern and head instead of N^2 (``block=1`` equals the dense
  :func:`longnet.backends.reference.count_matrix`, which also handles segment phases);
* :func:`count_stats` -- exact nonzeros and sum of C per head by
  inclusion-exclusion over the patterns that keep each row.

Patterns with segment phases are refused here (the block sums assume segments at
multiples of w); :mod:`longnet.analysis.reach` and the reference handle them.
"""


from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..patterns import (DilatedPattern, clip_segment, head_offset, keep_mask,
                        row_offset)
from ..checks import check_int

__all__ = ["keep_masks", "block_count_matrix", "count_stats", "check_pattern"]


def check_pattern(pattern) -> DilatedPattern:
    if isinstance(pattern, DilatedPattern):
        if any(pattern.segment_phases):
            # The block-sum drawings assume segments at multiples of w; refuse rather than misdraw.
            raise ValueError(f"segment_phases {pattern.segment_phases}: viz draws patterns without phases only; "
                             "for phased patterns use longnet.backends.reference.count_matrix(..., "
                             "segment_phases=...) and longnet.analysis.reach, which handle them")
        return pattern
    if isinstance(pattern, tuple) and len(pattern) == 2:
        return DilatedPattern(*pattern)
    raise TypeError("pattern must be a DilatedPattern or a (segment_lengths, dilation_rates) pair, "
                    f"got {type(pattern).__name__}")




def keep_masks(pattern, n: int, num_heads: int) -> np.ndarray:
    """(K, H, N) bool: ``[k, h, p]`` is True when pattern k keeps row p in head h.

    The rule is :func:`longnet.patterns.keep_mask` (row p is kept iff
    ``(p mod w) mod r == h mod r``), applied to numpy arrays.
    """
    pat = check_pattern(pattern)
    n, num_heads = check_int("n", n), check_int("num_heads", num_heads)
    pos = np.arange(n)
    heads = np.arange(num_heads)
    return np.stack([keep_mask(pos, heads, clip_segment(w, n), r) for w, r in pat])


def _pattern_block_sums(n: int, w: int, r: int, s: int, block: int, causal: bool) -> np.ndarray:
    """(nb, nb) float64: block sums of one pattern's C for head offset s.

    Per segment, C is the outer product of its kept-row indicator with itself,
    so the block sum is ``sum_seg outer(c_seg, c_seg)`` with c_seg[I] the kept
    rows of that segment in block I: pairs of (segment, block) entries of the
    same segment, never an N x N array.
    """
    nb = -(-n // block)
    pos = np.arange(n)
    p = pos[row_offset(pos, w, r) == s]
    out = np.zeros(nb * nb, dtype=np.float64)
    if p.size == 0:
        return out.reshape(nb, nb)
    seg = p // w
    blk = p // block
    key, cnt = np.unique(seg * nb + blk, return_counts=True)  # sorted by segment, then block
    eseg, eblk = key // nb, key % nb
    # Group entries by segment; emit every ordered pair of entries within a group.
    starts = np.flatnonzero(np.r_[True, eseg[1:] != eseg[:-1]])
    sizes = np.diff(np.r_[starts, eseg.size])
    gsize = np.repeat(sizes, sizes)
    gstart = np.repeat(starts, sizes)
    left = np.repeat(np.arange(eseg.size), gsize)  # query-side entry
    within = np.arange(left.size) - np.repeat(np.cumsum(gsize) - gsize, gsize)
    right = np.repeat(gstart, gsize) + within      # key-side entry
    bi, bj = eblk[left], eblk[right]
    weight = cnt[left].astype(np.float64) * cnt[right]
    if causal:
        # Key block after query block: nothing. Same block (only an entry paired with
        # itself, as (segment, block) entries are unique): c(c+1)/2 pairs with j <= p.
        self_pair = left == right
        c = cnt[left].astype(np.float64)
        weight = np.where(self_pair, c * (c + 1) / 2, weight)
        keep = bj <= bi
        bi, bj, weight = bi[keep], bj[keep], weight[keep]
    out += np.bincount(bi * nb + bj, weights=weight, minlength=nb * nb)
    return out.reshape(nb, nb)


def block_count_matrix(pattern, n: int, num_heads: int, *, causal: bool = False,
                 head: Optional[int] = None, block: int = 1) -> np.ndarray:
    """C of docs/design.md §2, summed over ``block x block`` tiles, as int64.

    Returns (H, nb, nb) for all heads, or (nb, nb) for ``head=h``, with
    ``nb = ceil(N / block)``; ``C[.., I, J]`` sums C[p, j] over queries p in
    tile I and keys j in tile J. ``block=1`` is C itself and equals
    ``backends.reference.count_matrix``; a large block gives a picture of
    N = 65536 without the N x N array.
    """
    pat = check_pattern(pattern)
    n, num_heads, block = check_int("n", n), check_int("num_heads", num_heads), check_int("block", block)
    heads = [check_int("head", head, 0, num_heads - 1)] if head is not None else range(num_heads)
    nb = -(-n // block)
    cache: Dict[Tuple[int, int], np.ndarray] = {}
    out = np.zeros((len(heads), nb, nb), dtype=np.float64)
    for i, h in enumerate(heads):
        for k, (w, r) in enumerate(pat):
            s = head_offset(h, r)
            if (k, s) not in cache:
                cache[(k, s)] = _pattern_block_sums(n, min(w, n), r, s, block, causal)
            out[i] += cache[(k, s)]
    out = np.rint(out).astype(np.int64)
    return out[0] if head is not None else out


def count_stats(pattern, n: int, num_heads: int, *, causal: bool = False) -> List[dict]:
    """Per head: ``nnz`` (pairs with C > 0), ``total`` (sum of C), ``dead`` (rows kept by no pattern).

    Exact without N x N: for row p, the keys of pattern k form
    ``{j in seg_k(p): j = p mod r_k}`` (if p is kept), so the union over
    patterns is counted by inclusion-exclusion; an intersection is the keys
    in the common interval congruent to p modulo lcm(r). The depth-first
    walk only carries rows kept by every pattern so far, which shrink fast.
    """
    pat = check_pattern(pattern)
    n, num_heads = check_int("n", n), check_int("num_heads", num_heads)
    w_t = [min(w, n) for w in pat.segment_lengths]
    r_t = list(pat.dilation_rates)
    pos = np.arange(n, dtype=np.int64)
    lo_k = [(pos // w) * w for w in w_t]
    hi_k = [np.minimum(lo + w, n) for lo, w in zip(lo_k, w_t)]
    if causal:
        hi_k = [np.minimum(hi, pos + 1) for hi in hi_k]
    results: Dict[tuple, dict] = {}
    out = []
    for h in range(num_heads):
        offs = tuple(head_offset(h, r) for r in r_t)
        if offs not in results:
            kept = [row_offset(pos, w, r) == s for w, r, s in zip(w_t, r_t, offs)]
            nnz = 0

            def walk(k0, rows, lo, hi, lcm, sign):
                nonlocal nnz
                for k in range(k0, len(w_t)):
                    sel = kept[k][rows]
                    if not sel.any():
                        continue
                    rk = rows[sel]
                    lo2 = np.maximum(lo[sel], lo_k[k][rk])
                    hi2 = np.minimum(hi[sel], hi_k[k][rk])
                    l2 = math.lcm(lcm, r_t[k])
                    p = pos[rk]
                    cnt = (hi2 - 1 - p) // l2 + (p - lo2) // l2 + 1
                    nnz += sign * int(cnt.sum())
                    walk(k + 1, rk, lo2, hi2, l2, -sign)

            walk(0, pos, np.zeros(n, dtype=np.int64), np.full(n, n, dtype=np.int64), 1, 1)
            total = 0
            for k in range(len(w_t)):
                p = pos[kept[k]]
                # keys of row p in pattern k: kept rows of its segment (<= p when causal)
                total += int(((hi_k[k][p] - 1 - p) // r_t[k] + (p - lo_k[k][p]) // r_t[k] + 1).sum())
            any_kept = np.logical_or.reduce(kept)
            results[offs] = dict(nnz=nnz, total=total, dead=int(n - any_kept.sum()))
        out.append(dict(head=h, **results[offs]))
    return out
