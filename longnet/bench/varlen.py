"""``longnet bench --varlen``: a packed variable-length batch against separate calls and padding (not a test).

B sequences with lengths drawn log-uniformly from [--min-len, --max-len] (seeded), H heads of
D. Timed, interleaved (so load bursts hit all alike), forward and forward+backward:

* ``packed``: one ``dilated_attention(q, k, v, ..., cu_seqlens=cu)`` on (T, H, D);
* ``separate``: one call per sequence on (1, L_i, H, D), summed (the cost to match);
* ``masked``: the padded (B, max L, H, D) batch with ``key_padding_mask``;
* ``padded``: the padded batch without a mask, every row computed (what padding costs).

Ratios are to ``separate``. Prints a table; ``--csv`` and ``--plot`` write the results.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .. import report
from ..argtypes import nonneg_int, output_file, pattern_from_flags, positive_int
from ..device import machine_name
from ..functional import dilated_attention
from ..patterns import DilatedPattern
from ..report import Column, Panel, Series
from ..varlen import cu_seqlens_from_lengths
from . import common
from .common import DTYPES

__all__ = ["Row", "draw_lengths", "measure", "build_parser", "run", "main"]

IMPLS = ("packed", "separate", "masked", "padded")


@dataclass
class Row:
    impl: str
    sequences: int
    tokens: int
    computed_rows: int
    fwd_ms: float
    fwdbwd_ms: float
    fwd_over_separate: float
    fwdbwd_over_separate: float


COLUMNS = (
    Column("impl", "impl", width=10, align="<"), Column("seqs", "sequences", width=5),
    Column("tokens", "tokens", width=8), Column("rows", "computed_rows", width=8),
    Column("fwd ms", "fwd_ms", ".1f"), Column("fwd+bwd ms", "fwdbwd_ms", ".1f", 11),
    Column("fwd / sep", "fwd_over_separate", ".3f"), Column("f+b / sep", "fwdbwd_over_separate", ".3f"),
)


def draw_lengths(count: int, low: int, high: int, seed: int) -> List[int]:
    """``count`` lengths log-uniform in [low, high] (document and slide lengths are heavy-tailed)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=g, dtype=torch.float64)
    return [int(round(math.exp(math.log(low) + x * (math.log(high) - math.log(low))))) for x in u.tolist()]


def _calls(lengths: List[int], heads: int, head_dim: int, dtype, pattern: DilatedPattern, causal: bool,
           backend: Optional[str]) -> Dict[str, Callable[[bool], Callable[[], None]]]:
    """impl -> make(backward) -> a no-argument call to time, all on the same data."""
    g = torch.Generator().manual_seed(0)
    t, n, b = sum(lengths), max(lengths), len(lengths)
    q, k, v, do = (torch.randn(t, heads, head_dim, generator=g).to(dtype) for _ in range(4))
    cu = cu_seqlens_from_lengths(lengths)
    starts = cu[:-1].tolist()
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    padded = [x.new_zeros(b, n, heads, head_dim) for x in (q, k, v, do)]
    for p, x in zip(padded, (q, k, v, do)):
        p[mask] = x
    w, r = pattern.segment_lengths, pattern.dilation_rates
    kw = dict(is_causal=causal, backend=backend)

    def attn(impl: str, a, b_, c):
        if impl == "packed":
            return [dilated_attention(a, b_, c, w, r, cu_seqlens=cu, **kw)]
        if impl == "separate":
            return [dilated_attention(a[None, s:s + n_], b_[None, s:s + n_], c[None, s:s + n_], w, r, **kw)[0]
                    for s, n_ in zip(starts, lengths)]
        return [dilated_attention(a, b_, c, w, r, key_padding_mask=mask if impl == "masked" else None, **kw)]

    def make(impl: str, backward: bool) -> Callable[[], None]:
        base = padded[:3] if impl in ("masked", "padded") else (q, k, v)
        grad_out = padded[3] if impl in ("masked", "padded") else do
        if not backward:
            def fwd():
                with torch.no_grad():
                    attn(impl, *base)
            return fwd
        leaves = [x.detach().requires_grad_() for x in base]

        def fwdbwd():
            for x in leaves:
                x.grad = None
            outs = attn(impl, *leaves)
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            out.backward(grad_out)
        return fwdbwd
    return {impl: (lambda backward, impl=impl: make(impl, backward)) for impl in IMPLS}


def measure(lengths: List[int], *, heads: int, head_dim: int, dtype, pattern: DilatedPattern, causal: bool,
            backend: Optional[str], repeats: int, warmup: int, impls=IMPLS) -> List[Row]:
    """Best-of-``repeats`` interleaved times of each impl, forward and forward+backward."""
    device = torch.device("cpu")
    makers = _calls(lengths, heads, head_dim, dtype, pattern, causal, backend)
    best = {}
    for backward in (False, True):
        times = common.interleaved_times([makers[i](backward) for i in impls], device, repeats, warmup)
        best[backward] = {i: min(ts) * 1e3 for i, ts in zip(impls, times)}
    rows = []
    b, t = len(lengths), sum(lengths)
    for i in impls:
        computed = b * max(lengths) if i == "padded" else t
        sep = best[False].get("separate", math.nan), best[True].get("separate", math.nan)
        rows.append(Row(i, b, t, computed, best[False][i], best[True][i], best[False][i] / sep[0],
                        best[True][i] / sep[1]))
    return rows


def plot(rows: List[Row], path: str, title: str) -> None:
    """Time of each impl, forward and forward+backward."""
    x = list(range(1, len(rows) + 1))
    p = Panel("time per layout (1 = " + ", ".join(f"{j} {r.impl}" for j, r in zip(x, rows)) + ")",
              "layout", "time (ms)", xticks=x)
    p.series += [Series("fwd", x, [r.fwd_ms for r in rows], "o-"),
                 Series("fwd+bwd", x, [r.fwdbwd_ms for r in rows], "s--")]
    report.plot_panels([p], path, title)


def build_parser(prog: str = "longnet bench --varlen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=positive_int, default=16)
    p.add_argument("--min-len", type=positive_int, default=256)
    p.add_argument("--max-len", type=positive_int, default=16384)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the drawn lengths")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--segment-lengths", default=None, help="comma-separated w_i (default: the paper's)")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i (default: the paper's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--backend", default=None, help="dilated_attention backend (default: auto)")
    p.add_argument("--no-padded", action="store_true", help="skip the padded and masked layouts (memory)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--quick", action="store_true", help="4 short sequences, one repeat: a smoke run")
    p.add_argument("--csv", type=output_file, default=None)
    p.add_argument("--plot", type=output_file, default=None)
    return p


def run(args: argparse.Namespace) -> int:
    if args.min_len > args.max_len:
        raise SystemExit(f"--min-len ({args.min_len}) must be <= --max-len ({args.max_len})")
    pattern = pattern_from_flags(args.segment_lengths, args.dilation_rates) or DilatedPattern.paper()
    if args.threads:
        torch.set_num_threads(args.threads)
    count, low, high, repeats = args.sequences, args.min_len, args.max_len, args.repeats
    if args.quick:
        count, low, high, repeats = 4, 16, 512, 1
        pattern = pattern_from_flags(args.segment_lengths, args.dilation_rates) or DilatedPattern((64, 128), (1, 2))
    lengths = draw_lengths(count, low, high, args.seed)
    impls = IMPLS[:2] if args.no_padded else IMPLS
    rows = measure(lengths, heads=args.heads, head_dim=args.head_dim, dtype=DTYPES[args.dtype], pattern=pattern,
                   causal=not args.non_causal, backend=args.backend, repeats=repeats, warmup=args.warmup,
                   impls=impls)
    title = (f"varlen: {count} sequences, lengths {min(lengths)}..{max(lengths)} (sum {sum(lengths)}), "
             f"H={args.heads} D={args.head_dim} {args.dtype}, {pattern}, {machine_name(torch.device('cpu'))}")
    report.publish(rows, COLUMNS, title + "\nlengths: " + ",".join(map(str, lengths)), args.csv, args.plot,
                   lambda r, path, _: plot(r, path, title))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
