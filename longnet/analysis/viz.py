"""``longnet viz``: draw dilation patterns, the mixture's count matrix C, and reach.

The command only: counting is :mod:`.counting`, drawing :mod:`.plotting`, reach
:mod:`.reach`. Drawing costs time and memory linearly in N (and in N*H for the kept-row
masks), all-pairs reach about N**2/64 word operations per layer, hence the limits below
(figures in docs/performance.md).
"""


from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Tuple


from ..patterns import (DilatedPattern, dense_flops, dilated_flops)
from . import reach as _reach
from ..argtypes import int_between, output_dir, pattern_from_flags, positive_int

from .counting import block_count_matrix, count_stats
from .plotting import plot_count_matrix, plot_depth_matrix, plot_depth_vs_n, plot_patterns

__all__ = ["add_arguments", "run"]

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
    c_head = block_count_matrix(pat, n, heads, causal=args.causal, head=args.head, block=block)
    written.append(plot_count_matrix(c_head, n, block, os.path.join(out, f"count_head{args.head}.png"),
                                     title=f"C, head {args.head} ({mode}), {pat}, N={n}", size=size,
                                     label="C: patterns sharing the (query, key) pair"))
    c_sum = block_count_matrix(pat, n, heads, causal=args.causal, block=block).sum(0)
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
