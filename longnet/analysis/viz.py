"""``longnet viz``: draw dilation patterns, the mixture's count matrix C, and reach.

Computation first (numpy, no N x N array unless asked for a tiny N):

* :func:`keep_masks` -- (K, H, N) rows kept by each pattern and head;
* :func:`count_matrix` -- C of docs/design.md §2 summed over b x b blocks, built
  from per-segment kept-row counts (``B = M^T M``), so N = 65536 costs about
  N/r work per pattern and head instead of N^2;
* :func:`count_stats` -- exact nonzeros and sum of C per head by
  inclusion-exclusion over the patterns that keep each row.

Plotting second (matplotlib, Agg backend, PNGs of an exact pixel size), then
the CLI (``add_arguments`` / ``run``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..fileio import atomic_savefig
from ..patterns import (DilatedPattern, clip_segment, dense_flops, dilated_flops, head_offset, keep_mask,
                        row_offset)
from . import reach as _reach
from ..argtypes import int_between, output_dir, pattern_from_flags, positive_int

__all__ = [
    "keep_masks",
    "count_matrix",
    "count_stats",
    "plot_patterns",
    "plot_count_matrix",
    "plot_depth_matrix",
    "plot_depth_vs_n",
    "png_size",
    "add_arguments",
    "run",
]


def _pattern(pattern) -> DilatedPattern:
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


def _positive(name, val) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name} must be a positive integer, got {val!r}")
    return int(val)


# --------------------------------------------------------------------------- computation

def keep_masks(pattern, n: int, num_heads: int) -> np.ndarray:
    """(K, H, N) bool: ``[k, h, p]`` is True when pattern k keeps row p in head h.

    The rule is :func:`longnet.patterns.keep_mask` (row p is kept iff
    ``(p mod w) mod r == h mod r``), applied to numpy arrays.
    """
    pat = _pattern(pattern)
    n, num_heads = _positive("n", n), _positive("num_heads", num_heads)
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


def count_matrix(pattern, n: int, num_heads: int, *, causal: bool = False,
                 head: Optional[int] = None, block: int = 1) -> np.ndarray:
    """C of docs/design.md §2, summed over ``block x block`` tiles, as int64.

    Returns (H, nb, nb) for all heads, or (nb, nb) for ``head=h``, with
    ``nb = ceil(N / block)``; ``C[.., I, J]`` sums C[p, j] over queries p in
    tile I and keys j in tile J. ``block=1`` is C itself and equals
    ``backends.reference.count_matrix``; a large block gives a picture of
    N = 65536 without the N x N array.
    """
    pat = _pattern(pattern)
    n, num_heads, block = _positive("n", n), _positive("num_heads", num_heads), _positive("block", block)
    if head is not None and not (isinstance(head, (int, np.integer)) and 0 <= head < num_heads):
        raise ValueError(f"head must be an integer in [0, {num_heads}), got {head!r}")
    heads = [int(head)] if head is not None else range(num_heads)
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
    pat = _pattern(pattern)
    n, num_heads = _positive("n", n), _positive("num_heads", num_heads)
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


# --------------------------------------------------------------------------- plotting

def _figure(size: Tuple[int, int]):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    return fig, plt


def _save(fig, path: str) -> str:
    """Write atomically at the figure's exact pixel size (no tight bbox, which would resize it)."""
    return atomic_savefig(fig, path, dpi=fig.dpi)


def png_size(path: str) -> Tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR header; ValueError if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _bin_mean(x: np.ndarray, bins: int) -> Tuple[np.ndarray, int]:
    """Mean over the last axis in chunks so at most ``bins`` remain; returns (values, chunk)."""
    n = x.shape[-1]
    b = max(1, -(-n // bins))
    nb = -(-n // b)
    pad = nb * b - n
    xf = x.astype(np.float64)
    s = np.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], nb, b).sum(-1)
    counts = np.full(nb, b, dtype=np.float64)
    counts[-1] = b - pad
    return s / counts, b


def plot_patterns(pattern, n: int, num_heads: int, path: str, *, size=(1200, 900),
                  max_pixels: int = 512, zoom: int = 256) -> str:
    """Each pattern's kept rows per head (rows: heads, columns: positions) and segment edges.

    Left column: the whole sequence, binned to at most ``max_pixels`` columns
    (a pixel's value is the fraction of its positions kept). Right column,
    when N > ``zoom``: positions 0..zoom-1, one pixel per position. The last
    row counts how many patterns keep each row; red marks rows kept by none.
    """
    pat = _pattern(pattern)
    masks = keep_masks(pat, n, num_heads)  # (K, H, N)
    cover = masks.sum(0)                   # (H, N)
    fig, plt = _figure(size)
    zoomed = n > zoom
    ncols = 2 if zoomed else 1
    k = len(pat)
    axes = fig.subplots(k + 1, ncols, squeeze=False)
    import matplotlib.colors as mcolors
    cover_cmap = mcolors.ListedColormap(["#d62728"] + [plt.cm.Blues(x) for x in np.linspace(0.3, 1, k)])

    def draw(ax, img, lo, hi, w, binned, cmap, vmax, title):
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax,
                  extent=(lo - 0.5, hi - 0.5, num_heads - 0.5, -0.5))
        if w is not None:
            edges = np.arange((lo // w + 1) * w, hi, w)
            if edges.size <= 64:
                for e in edges:
                    ax.axvline(e - 0.5, color="orange", lw=0.8)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_ylabel("head", fontsize=7)

    _, b = _bin_mean(masks[0], max_pixels)
    for row in range(k + 1):
        for col in range(ncols):
            ax = axes[row, col]
            hi = n if col == 0 else zoom
            if row < k:
                w, r = pat.segment_lengths[row], pat.dilation_rates[row]
                m = masks[row][:, :hi]
                cmap, vmax = "Greys", 1
                title = f"pattern {row}: w={w}, r={r} (kept rows black, segment edges orange)"
            else:
                m, w, cmap, vmax = cover[:, :hi], None, cover_cmap, k
                title = "patterns keeping each row (red: kept by none)"
            if col == 0:
                img, bb = _bin_mean(m, max_pixels)
                if bb > 1:
                    title += f" [binned: {bb} positions/pixel]"
            else:
                img, bb = m.astype(np.float64), 1
                title += f" [zoom 0..{zoom - 1}]"
            draw(ax, img, 0, hi, w, bb > 1, cmap, vmax, title)
        axes[row, 0].set_xlabel("position" if row == k else "", fontsize=7)
    fig.suptitle(f"{pat}  N={n}  H={num_heads}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.06, hspace=0.9, wspace=0.12)
    return _save(fig, path)


def plot_count_matrix(c_blocks: np.ndarray, n: int, block: int, path: str, *, title: str,
                      size=(1200, 900), label: str = "C") -> str:
    """Draw block sums of C (nb, nb) as the mean C per entry of each tile (log colour scale).

    Rows are queries p, columns keys j, like ``C[p, j]``.
    """
    import matplotlib.colors as mcolors
    nb = c_blocks.shape[0]
    sizes = np.full(nb, block, dtype=np.float64)
    sizes[-1] = n - block * (nb - 1)
    mean = c_blocks / (sizes[:, None] * sizes[None, :])
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    pos = mean[mean > 0]
    vmin = pos.min() if pos.size else 1.0
    vmax = max(pos.max() if pos.size else 1.0, vmin * 1.0001)
    shown = np.ma.masked_where(mean <= 0, mean)
    if block > 1:
        # Block means span orders of magnitude (dense near-diagonal tiles, sparse far ones).
        cmap, norm = plt.get_cmap("viridis").copy(), mcolors.LogNorm(vmin=vmin, vmax=vmax)
    else:
        levels = int(round(vmax))
        cmap = plt.get_cmap("viridis", max(levels, 1)).copy()
        norm = mcolors.Normalize(vmin=0.5, vmax=levels + 0.5)
    cmap = cmap.with_extremes(bad="white")
    im = ax.imshow(shown, cmap=cmap, interpolation="nearest", norm=norm,
                   extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, label=(label + " (mean per entry of a block)") if block > 1 else label)
    if block == 1 and levels <= 20:
        cb.set_ticks(range(1, levels + 1))
    if block > 1:
        title += f"\ndownsampled: each pixel is a {block}x{block} block of (query, key) pairs"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position p")
    fig.subplots_adjust(left=0.08, right=0.95, top=0.9, bottom=0.08)
    return _save(fig, path)


def plot_depth_matrix(depth: np.ndarray, path: str, *, title: str, size=(1200, 900),
                      max_pixels: int = 512, causal: bool = False) -> str:
    """Draw layers-to-reach ``D[i, j]`` (target i, source j); grey = never connected.

    Downsampled by the max over tiles, so a tile shows its worst pair. When
    causal, pairs with j > i are not pairs at all and stay white.
    """
    n = depth.shape[0]
    b = max(1, -(-n // max_pixels))
    nb = -(-n // b)
    d = np.full((nb * b, nb * b), -2, dtype=np.int32)  # -2: padding / not a pair
    d[:n, :n] = depth
    if causal:
        d[:n, :n][np.triu(np.ones((n, n), dtype=bool), k=1)] = -2
    tiles = d.reshape(nb, b, nb, b)
    never = (tiles == -1).any(axis=(1, 3))
    worst = tiles.max(axis=(1, 3)).astype(np.float64)  # -2 (below vmin, white) for non-pairs only
    top = max(int(depth.max()), 1)
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    cmap = plt.get_cmap("magma_r", top + 1).with_extremes(bad="lightgrey", under="white")
    im = ax.imshow(np.ma.masked_where(never, worst), cmap=cmap, vmin=-0.5, vmax=top + 0.5,
                   interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, label="layers for j to reach i")
    if top <= 20:
        cb.set_ticks(range(0, top + 1))
    if b > 1:
        title += f"\ndownsampled: each pixel is the worst pair of a {b}x{b} block"
    ax.set_title(title + "  (grey: never connected)", fontsize=10)
    ax.set_xlabel("source token j")
    ax.set_ylabel("target token i")
    fig.subplots_adjust(left=0.08, right=0.95, top=0.9, bottom=0.08)
    return _save(fig, path)


def plot_depth_vs_n(curves: Dict[str, list], path: str, *, title: str, size=(1200, 900)) -> str:
    """Max depth against N (log2 axis) for each curve of :func:`reach.depth_vs_n` rows,
    plus the paper's estimate; hollow markers mean some pairs are never connected."""
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    est = None
    for label, rows in curves.items():
        ns = [r["n"] for r in rows]
        ds = [r["max_depth"] if r["max_depth"] is not None else np.nan for r in rows]
        line, = ax.plot(ns, ds, "-", label=label)
        full = [r["never_connected"] == 0 for r in rows]
        ax.plot([x for x, f in zip(ns, full) if f], [y for y, f in zip(ds, full) if f], "o",
                color=line.get_color())
        if not all(full):
            ax.plot([x for x, f in zip(ns, full) if not f], [y for y, f in zip(ds, full) if not f], "o",
                    mfc="none", color=line.get_color(), label=label + ": some pairs never connected")
        est = rows
    if est:
        ax.plot([r["n"] for r in est], [r["paper_estimate"] for r in est], "k--",
                label="paper estimate log_a(N(a-1)/w0)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (largest segment = N)")
    ax.set_ylabel("max layers over all token pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.92, bottom=0.08)
    return _save(fig, path)


# --------------------------------------------------------------------------- CLI

# Drawing costs time and memory linearly in N (and in N*H for the kept-row masks): at the limits,
# N = 2**22 with 16 heads, the paper's pattern took 45 s and 2.2 GB. All-pairs reach costs about
# N**2/64 word operations per layer: N = 65536 took 25-80 s.
MAX_DRAW_N = 1 << 22
MAX_DRAW_ENTRIES = 1 << 26
MAX_REACH_N = 1 << 17


def _image_size(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1200x900, got {text!r}") from None
    if not (200 <= w <= 8000 and 200 <= h <= 8000):
        raise argparse.ArgumentTypeError(f"width and height must be in [200, 8000] pixels, got {w}x{h}")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segment-lengths", metavar="W1,W2,..", help="comma-separated segment lengths w_i")
    parser.add_argument("--dilation-rates", metavar="R1,R2,..", help="comma-separated dilation rates r_i")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's pattern w=2048..32768, r=1,2,4,6,12")
    parser.add_argument("--n", type=int_between(1, MAX_DRAW_N, " (the largest N viz draws)"), required=True,
                        help=f"sequence length N (at most {MAX_DRAW_N})")
    parser.add_argument("--heads", type=positive_int, default=8, help="number of heads H (default 8)")
    parser.add_argument("--causal", action="store_true", help="causal count matrix and reach")
    parser.add_argument("--out", type=output_dir, default="viz",
                        help="output directory for the PNGs (default ./viz)")
    parser.add_argument("--head", type=int, default=0, help="head drawn in the single-head count matrix")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="head dim D for the FLOP count")
    parser.add_argument("--max-pixels", type=positive_int, default=512,
                        help="largest matrix side in pixels; bigger N is drawn as block sums (default 512)")
    parser.add_argument("--image-size", type=_image_size, default=(1200, 900), metavar="WxH",
                        help="size of every PNG in pixels (default 1200x900)")
    parser.add_argument("--reach", action="store_true",
                        help=f"all-pairs layer depth at N (N <= {MAX_REACH_N}), and depth vs N for "
                             "geometric patterns")
    parser.add_argument("--reach-max-n", type=int_between(1, MAX_REACH_N, " (all-pairs reach costs N**2)"),
                        default=4096, help="largest N of the depth-vs-N curve (default 4096)")


def _resolve_pattern(args) -> DilatedPattern:
    given = args.segment_lengths is not None or args.dilation_rates is not None
    if args.paper and given:
        raise ValueError("--paper cannot be combined with --segment-lengths/--dilation-rates")
    if args.paper:
        return DilatedPattern.paper()
    pat = pattern_from_flags(args.segment_lengths, args.dilation_rates)
    if pat is None:
        raise ValueError("give both --segment-lengths and --dilation-rates (e.g. 8,16,32 and 1,2,4), or --paper")
    return pat


def _check_args(args) -> DilatedPattern:
    """The pattern, once every argument is checked; ValueError naming the flag otherwise."""
    pat = _resolve_pattern(args)
    n, heads = args.n, args.heads
    if not 0 <= args.head < heads:
        raise ValueError(f"--head must be in [0, {heads}) for --heads {heads}, got {args.head}")
    if args.max_pixels < 16:
        raise ValueError(f"--max-pixels must be >= 16, got {args.max_pixels}")
    if n * heads > MAX_DRAW_ENTRIES:
        raise ValueError(f"--n {n} x --heads {heads} = {n * heads} kept-row entries per pattern is more than "
                         f"viz draws ({MAX_DRAW_ENTRIES}); use fewer heads or a smaller --n")
    if args.reach and n > MAX_REACH_N:
        raise ValueError(f"--reach needs --n <= {MAX_REACH_N} (all-pairs reach costs about N**2/64 word "
                         f"operations per layer), got {n}")
    return pat


def _geometric_params(pat: DilatedPattern) -> Tuple[int, int, int, bool]:
    """(w0, alpha, r0, exact): the pattern's own ratio when geometric, else alpha=2."""
    w, r = pat.segment_lengths, pat.dilation_rates
    if len(w) > 1 and w[1] % w[0] == 0:
        a = w[1] // w[0]
        if a >= 2 and all(w[i] == w[0] * a**i and r[i] == r[0] * a**i for i in range(len(w))):
            return w[0], a, r[0], True
    return w[0], 2, r[0], False


def _print_summary(pat: DilatedPattern, args) -> None:
    """Density of C, FLOPs against dense, and per head nnz, sum and rows kept by no pattern."""
    n, heads, causal, d = args.n, args.heads, args.causal, args.head_dim
    stats = count_stats(pat, n, heads, causal=causal)
    pairs = n * (n + 1) // 2 if causal else n * n
    fl = dilated_flops(n, heads, d, pat.segment_lengths, pat.dilation_rates, causal=causal)
    fd = dense_flops(n, heads, d, causal=causal)
    nnz_all = sum(s["nnz"] for s in stats)
    print(f"density of C (nonzero pairs / {'N(N+1)/2' if causal else 'N^2'}): "
          f"{nnz_all / (heads * pairs):.6f} averaged over heads")
    print(f"FLOPs (D={d}, forward): dilated {fl:.4g} vs dense {fd:.4g} -> {fd / fl:.2f}x fewer")
    print(f"{'head':>4} {'density':>10} {'nnz(C)':>14} {'sum(C)':>14} {'rows kept by no pattern':>24}")
    for s in stats:
        print(f"{s['head']:>4} {s['nnz'] / pairs:>10.6f} {s['nnz']:>14} {s['total']:>14} {s['dead']:>24}")


def _draw_counts(pat: DilatedPattern, args, block: int, mode: str) -> List[str]:
    """patterns.png, count_head{h}.png and count_sum.png; returns their paths."""
    n, heads, out, size = args.n, args.heads, args.out, tuple(args.image_size)
    written = [plot_patterns(pat, n, heads, os.path.join(out, "patterns.png"), size=size,
                             max_pixels=args.max_pixels)]
    c_head = count_matrix(pat, n, heads, causal=args.causal, head=args.head, block=block)
    written.append(plot_count_matrix(c_head, n, block, os.path.join(out, f"count_head{args.head}.png"),
                                     title=f"C, head {args.head} ({mode}), {pat}, N={n}", size=size,
                                     label="C: patterns sharing the (query, key) pair"))
    c_sum = count_matrix(pat, n, heads, causal=args.causal, block=block).sum(0)
    written.append(plot_count_matrix(c_sum, n, block, os.path.join(out, "count_sum.png"),
                                     title=f"C summed over {heads} heads ({mode}), {pat}, N={n}", size=size,
                                     label="C summed over heads"))
    return written


def _draw_reach_at_n(pat: DilatedPattern, args, mode: str) -> List[str]:
    """Print the all-pairs reach at N; draw reach_depth.png when N is small enough."""
    n, heads, causal = args.n, args.heads, args.causal
    t1 = time.perf_counter()
    if n > 8192:
        print(f"computing all-pairs reach at N={n} (bit-parallel BFS; can take a minute) ...", flush=True)
    res = _reach.reach(pat, n, heads, causal=causal)
    print(res.summary() + f"  [{time.perf_counter() - t1:.1f}s]")
    if n > 4096:
        print("reach_depth.png skipped: the per-pair depth picture needs N <= 4096")
        return []
    dm = _reach.depth_matrix(pat, n, heads, causal=causal)
    return [plot_depth_matrix(dm, os.path.join(args.out, "reach_depth.png"), size=tuple(args.image_size),
                              max_pixels=args.max_pixels, causal=causal,
                              title=f"layers for token j to reach token i ({mode}), {pat}, H={heads}")]


def _draw_depth_vs_n(pat: DilatedPattern, args, mode: str) -> List[str]:
    """Print and draw max depth against N for the geometric pattern closest to ``pat``."""
    w0, alpha, r0, exact = _geometric_params(pat)
    if not exact:
        print(f"pattern is not geometric: depth-vs-N uses geometric w0={w0}, alpha=2, r0={r0}")
    ns, m = [], w0
    while m <= args.reach_max_n:
        ns.append(m)
        m *= alpha
    if not ns:
        print(f"depth-vs-N skipped: --reach-max-n {args.reach_max_n} < w0 = {w0}")
        return []
    kw = dict(alpha=alpha, base_rate=r0, causal=args.causal)
    curves = {f"H={args.heads}": _reach.depth_vs_n(w0, ns, args.heads, **kw),
              "H=r_max (all offsets used)": _reach.depth_vs_n(w0, ns, None, **kw)}
    print(f"depth vs N, geometric w0={w0} alpha={alpha} r0={r0} ({mode}), largest segment = N:")
    print(f"{'N':>8} {'estimate':>9} " + " ".join(f"{k:>28}" for k in curves))
    for i, nn in enumerate(ns):
        cells = []
        for rows in curves.values():
            md = "-" if rows[i]["max_depth"] is None else str(rows[i]["max_depth"])
            cells.append(f"{md + (' (+never)' if rows[i]['never_connected'] else ''):>28}")
        print(f"{nn:>8} {curves[f'H={args.heads}'][i]['paper_estimate']:>9.2f} " + " ".join(cells))
    return [plot_depth_vs_n(
        curves, os.path.join(args.out, "reach_vs_n.png"), size=tuple(args.image_size),
        title=f"max layers between any two tokens, geometric w0={w0}, alpha={alpha}, r0={r0} ({mode})")]


def run(args) -> int:
    """Check every argument, print the summary, then draw (and with --reach, compute reach)."""
    try:
        pat = _check_args(args)
    except ValueError as e:
        print(f"longnet viz: error: {e}", file=sys.stderr)
        return 2
    n, mode = args.n, "causal" if args.causal else "non-causal"
    block = max(1, -(-n // args.max_pixels))
    print(f"pattern {pat}  N={n}  H={args.heads}  {mode}")
    if block > 1:
        print(f"N={n} > --max-pixels {args.max_pixels}: count matrices are drawn downsampled, "
              f"each pixel the mean of a {block}x{block} block of C; pattern rows binned to "
              f"{block} positions per pixel, with a full-resolution zoom on the first 256 positions")
    _print_summary(pat, args)
    t0 = time.perf_counter()
    written = _draw_counts(pat, args, block, mode)
    if args.reach:
        written += _draw_reach_at_n(pat, args, mode) + _draw_depth_vs_n(pat, args, mode)
    size = tuple(args.image_size)
    print(f"wrote {len(written)} PNGs of {size[0]}x{size[1]} pixels to {args.out}/ "
          f"[{time.perf_counter() - t0:.1f}s]:")
    for p in written:
        print(f"  {p}")
    return 0
