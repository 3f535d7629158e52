"""``longnet bench``: time and memory of dilated vs dense attention (not a test).

For each N it measures forward and forward+backward of ``dilated_attention``
and of two dense baselines on the same machine in the same run: causal
``F.scaled_dot_product_attention`` (what a user would otherwise run), and dense
attention through ``dilated_attention`` itself (one pattern, w = N, r = 1: the
same kernels, so the op's ratio to it is the pattern's alone; where longnet's
kernel is faster than PyTorch's, the ratio to SDPA is larger by that factor).
Also peak memory growth, and achieved GFLOP/s by docs/design.md §3's count.
Prints a table; ``--csv`` and ``--plot`` write the results.

``--figure5`` times the forward only, from 4K to 1M tokens, and plots time against N
like the paper's Figure 5: dense is measured up to ``--dense-max-n`` (32768) and
beyond it extrapolated by the quadratic fit t = a N + b N^2 of its measured times
(rows ``dense-extrapolated``, drawn dashed), never presented as measured.

Peak memory: on CUDA from the allocator's statistics; on CPU as growth of the
resident set sampled in a thread, which the allocator's reuse of freed pages
blurs for small tensors, so read it at large N (e.g. ``--n 65536 --no-dense``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .. import report
from ..argtypes import (
    nonneg_int,
    output_file,
    pattern_from_flags,
    positive_int,
    positive_int_list,
)
from ..device import machine_name, memory_bytes
from ..patterns import DilatedPattern, dense_flops, dilated_flops
from ..report import Column, Panel, Series
from . import common
from .common import DTYPES, PATTERN_VARIANTS

NAN = float("nan")
EXTRAPOLATED = "dense-extrapolated"  # impl of --figure5's rows that come from the fit, not a measurement
FIGURE5_N = [4096 * 2**i for i in range(9)]  # 4K .. 1M
FIGURE5_DENSE_MAX_N = 32768


@dataclass
class Row:
    impl: str
    n: int
    fwd_ms: float
    fwdbwd_ms: float
    fwd_gflops: float
    fwdbwd_gflops: float
    peak_mem_mib: float
    io_mib: float
    mem_over_io: float
    # (memory the inputs q, k, v, dO took + the fwd+bwd's peak growth) / io: everything the call needs
    total_over_io: float = NAN
    dense_over_dilated_fwd: float = NAN
    dense_over_dilated_fwdbwd: float = NAN
    dense_over_dilated_flops: float = NAN  # the ideal speed-up: docs/design.md §3's FLOP ratio
    op_dense_over_dilated_fwd: float = NAN  # against dense attention through the op (same kernels)
    op_dense_over_dilated_fwdbwd: float = NAN
    # --pattern paper+lw16, on the lw16 row: (its time / the paper pattern's) / (its FLOPs / theirs)
    fwd_cost_per_flop_vs_paper: float = NAN
    fwdbwd_cost_per_flop_vs_paper: float = NAN


COLUMNS = (
    Column("impl", "impl", width=18, align="<"), Column("N", "n", width=8),
    Column("fwd ms", "fwd_ms", ".1f"), Column("fwd+bwd ms", "fwdbwd_ms", ".1f", 11),
    Column("fwd GF/s", "fwd_gflops", ".1f", 9), Column("f+b GF/s", "fwdbwd_gflops", ".1f", 9),
    Column("mem MiB", "peak_mem_mib", ".0f", 8), Column("mem/io", "mem_over_io", ".2f", 7),
    Column("all/io", "total_over_io", ".2f", 7),
    Column("dense/dil fwd", "dense_over_dilated_fwd", ".2f", 14),
    Column("dense/dil f+b", "dense_over_dilated_fwdbwd", ".2f", 14),
    Column("FLOP ratio", "dense_over_dilated_flops", ".2f", 11),
    Column("op-dense/dil fwd", "op_dense_over_dilated_fwd", ".2f", 17),
    Column("op-dense/dil f+b", "op_dense_over_dilated_fwdbwd", ".2f", 17),
    Column("t/FLOP vs paper fwd", "fwd_cost_per_flop_vs_paper", ".2f", 20),
    Column("t/FLOP vs paper f+b", "fwdbwd_cost_per_flop_vs_paper", ".2f", 20),
)
# --pattern paper+lw16: the lw16 variant timed in turn with the paper pattern, as a row of its own.
COMPARE = "paper+lw16"
VARIANT_IMPL = "dilated+lw16"


def measure(n: int, *, heads: int, head_dim: int, batch: int, pattern: DilatedPattern, dtype,
            device, causal: bool, backend: Optional[str], repeats: int, warmup: int,
            dense: bool, memory: bool, fwdbwd: bool = True, dense_op: bool = False,
            variant: Optional[DilatedPattern] = None) -> List[Row]:
    """One Row for the dilated op, with ``dense`` one for dense SDPA, with ``dense_op`` one for
    dense attention through the op (w = N, r = 1), and with ``variant`` one for the op with that
    pattern (``--pattern paper+lw16``), at length n; all timed in turn.

    ``fwdbwd=False`` times the forward only (fwd+bwd columns NaN, no memory measurement): what
    ``--figure5`` needs at lengths where the gradients would not fit."""
    shape = (batch, n, heads, head_dim)
    before = common.memory_in_use(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Forward-only draws no output gradient: at N = 1M it would be 3 GiB more to hold.
    q, k, v, *rest = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3 + fwdbwd))
    do = rest[0] if rest else None
    io_bytes = 8 * q.numel() * q.element_size()  # q, k, v, out and their gradients
    input_bytes = common.memory_in_use(device) - before
    kw = dict(causal=causal, batch=batch)

    def flops_of(p: DilatedPattern) -> List[float]:
        return [dilated_flops(n, heads, head_dim, p.segment_lengths, p.dilation_rates, backward=bwd,
                              segment_phases=p.segment_phases, **kw) for bwd in (False, True)]

    dil_flops = flops_of(pattern)
    dense_fl = [dense_flops(n, heads, head_dim, backward=bwd, **kw) for bwd in (False, True)]
    # (name, impl, (fwd FLOPs, fwd+bwd FLOPs), pattern); dense impls ignore the pattern
    impls = [(f"dilated[{backend or 'auto'}]", backend, dil_flops, pattern)]
    if variant is not None:
        impls.append((VARIANT_IMPL, backend, flops_of(variant), variant))
    if dense:
        impls.append(("dense-sdpa", common.DENSE, dense_fl, pattern))
    if dense_op:
        impls.append(("dense-op", common.DENSE_OP, dense_fl, pattern))
    calls = {m: [common.attention_call(impl, m, q, k, v, do, p, causal) for _, impl, _, p in impls]
             for m in ("fwd", "fwdbwd")}
    # Dilated and dense take turns (common.interleaved_times), so load bursts hit both alike.
    t_f = [min(ts) for ts in common.interleaved_times(calls["fwd"], device, repeats, warmup)]
    if not fwdbwd:
        t_fb, mems = [NAN] * len(impls), [NAN] * len(impls)
    elif memory and repeats == 1 and warmup == 0:
        # One call only (as at 1M tokens, where each takes minutes): its time and its memory.
        t_fb, mems = zip(*(_timed_memory(fb, device) for fb in calls["fwdbwd"]))
    else:
        t_fb = [min(ts) for ts in common.interleaved_times(calls["fwdbwd"], device, repeats, warmup)]
        mems = [common.peak_memory_growth(fb, device) if memory else 0 for fb in calls["fwdbwd"]]
    rows = [Row(name, n, tf * 1e3, tfb * 1e3, fl_f / tf / 1e9, fl_fb / tfb / 1e9, mem / 2**20, io_bytes / 2**20,
                mem / io_bytes, (input_bytes + mem) / io_bytes)
            for (name, _, (fl_f, fl_fb), _), tf, tfb, mem in zip(impls, t_f, t_fb, mems)]
    rows[0].dense_over_dilated_flops = dense_fl[0] / dil_flops[0]
    by = {r.impl: r for r in rows}
    if variant is not None:
        var, (v_f, v_fb) = by[VARIANT_IMPL], impls[1][2]  # impls[1] is the variant
        var.fwd_cost_per_flop_vs_paper = (var.fwd_ms / rows[0].fwd_ms) / (v_f / dil_flops[0])
        var.fwdbwd_cost_per_flop_vs_paper = (var.fwdbwd_ms / rows[0].fwdbwd_ms) / (v_fb / dil_flops[1])
    if dense:
        rows[0].dense_over_dilated_fwd = by["dense-sdpa"].fwd_ms / rows[0].fwd_ms
        rows[0].dense_over_dilated_fwdbwd = by["dense-sdpa"].fwdbwd_ms / rows[0].fwdbwd_ms
    if dense_op:
        rows[0].op_dense_over_dilated_fwd = by["dense-op"].fwd_ms / rows[0].fwd_ms
        rows[0].op_dense_over_dilated_fwdbwd = by["dense-op"].fwdbwd_ms / rows[0].fwdbwd_ms
    return rows


def _timed_memory(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, int]:
    """(seconds, peak memory growth in bytes) of one call of ``fn``; the CPU sampler costs about 1%."""
    seconds: List[float] = []
    mem = common.peak_memory_growth(lambda: seconds.append(common.best_of(fn, device, 1, 0)), device)
    return seconds[0], mem


def format_table(rows: List[Row]) -> str:
    return report.format_table(rows, COLUMNS)


def write_csv(rows: List[Row], path: str) -> None:
    report.write_csv(rows, path)


def plot(rows: List[Row], path: str, title: str) -> None:
    """Time (log-log) and GFLOP/s against N, forward and forward+backward, one line per impl."""
    log = ("log", {})
    time_p = Panel("time", "sequence length N", "time (ms)", xscale=log, yscale=log)
    rate_p = Panel("throughput", "sequence length N", "GFLOP/s (docs/design.md §3 count)", xscale=log)
    for impl in dict.fromkeys(r.impl for r in rows):
        rs = [r for r in rows if r.impl == impl]
        ns = [r.n for r in rs]
        time_p.series += [Series(f"{impl} fwd", ns, [r.fwd_ms for r in rs], "o-"),
                          Series(f"{impl} fwd+bwd", ns, [r.fwdbwd_ms for r in rs], "s--")]
        rate_p.series += [Series(f"{impl} fwd", ns, [r.fwd_gflops for r in rs], "o-"),
                          Series(f"{impl} fwd+bwd", ns, [r.fwdbwd_gflops for r in rs], "s--")]
    report.plot_panels([time_p, rate_p], path, title)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=positive_int_list, default=None,
                   help="comma-separated sequence lengths (default 4096,8192,16384; --quick: 2048,4096)")
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--segment-lengths", default=None, help="comma-separated w_i (default: the paper's)")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i (default: the paper's)")
    p.add_argument("--pattern", choices=sorted(PATTERN_VARIANTS) + [COMPARE], default="paper",
                   help="paper: the pattern of --segment-lengths/--dilation-rates as it is; lw16: the same plus "
                        "the LM presets' local window (DilatedPattern.with_local_window(16): two phased r = 1 "
                        f"patterns of 16 rows); {COMPARE}: both, timed in turn, with the local window's time "
                        "per FLOP against the paper pattern's")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--non-causal", action="store_true", help="benchmark non-causal attention")
    p.add_argument("--backend", default=None, help="dilated_attention backend (default: auto)")
    p.add_argument("--no-dense", action="store_true", help="skip both dense baselines")
    p.add_argument("--no-dense-op", action="store_true",
                   help="skip the second dense baseline, dense attention through the op itself (w = N, r = 1, "
                        "the same kernels as the dilated op); --figure5 never runs it")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per measurement; the best is reported")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run of seconds")
    p.add_argument("--csv", type=output_file, default=None, help="write results to this CSV file")
    p.add_argument("--plot", type=output_file, default=None, help="write a PNG plot to this file")
    p.add_argument("--dense-max-n", type=positive_int, default=None,
                   help=f"run dense SDPA only at N up to this (default: every N; --figure5: {FIGURE5_DENSE_MAX_N})")
    p.add_argument("--figure5", action="store_true",
                   help="forward time against N, dilated vs dense, like the paper's Figure 5 (default N 4096 to "
                        "1048576): dense measured up to --dense-max-n and extrapolated beyond by a quadratic fit "
                        "of its measured times, drawn dashed; needs --plot")
    p.add_argument("--breakdown", action="store_true",
                   help="where the dilated op's time goes: the share inside its kernel calls, the ratio the "
                        "kernel alone allows, and the kernel's causal against unmasked time at each kept length")
    p.add_argument("--lm", action="store_true",
                   help="run the LM training-throughput benchmark instead (its own options: longnet bench --lm --help)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="run the weak-scaling benchmark of sequence parallelism instead (its own options: "
                        "longnet bench --sequence-parallel --help)")


def _lengths(args) -> List[int]:
    if args.n:
        return args.n
    if args.figure5:
        return FIGURE5_N
    return [2048, 4096] if args.quick else [4096, 8192, 16384]


def _dense_max_n(args) -> Optional[int]:
    """The longest N dense SDPA runs at (None: every N)."""
    return FIGURE5_DENSE_MAX_N if args.figure5 and args.dense_max_n is None else args.dense_max_n


def _check_breakdown(args) -> None:
    if not args.breakdown:
        return
    for flag, given in (("--figure5", args.figure5), ("--plot", args.plot), ("--no-dense", args.no_dense),
                        (f"--pattern {args.pattern}", args.pattern != "paper")):  # its clock sees segment calls only
        if given:
            raise ValueError(f"--breakdown prints two tables against dense attention: drop {flag}")


def _check_figure5(args, ns: List[int]) -> None:
    if not args.figure5:
        return
    if not args.plot:
        raise ValueError("--figure5 draws a plot: give --plot FILE.png")
    if args.no_dense:
        raise ValueError("--figure5 compares against dense attention: drop --no-dense")
    dense_ns = sorted({n for n in ns if n <= _dense_max_n(args)})
    if len(dense_ns) < 2:
        raise ValueError(f"--figure5 extrapolates dense from a fit of its measured times: give at least two "
                         f"--n at or below --dense-max-n {_dense_max_n(args)}, got {dense_ns or 'none'}")


def _checked(args) -> Tuple[DilatedPattern, torch.device, List[int]]:
    """(pattern, device, lengths) once every argument is checked; ValueError naming the flag if not."""
    from ..backends.registry import get_backend
    from ..device import pick_device  # the one rule for --device
    pattern = pattern_from_flags(args.segment_lengths, args.dilation_rates)
    device = pick_device(args.device)
    ns = _lengths(args)
    _check_figure5(args, ns)
    _check_breakdown(args)
    dtype = DTYPES[args.dtype]
    tensors, what = (4, "q, k, v and out") if args.figure5 else (8, "q, k, v, out and their gradients")
    need = tensors * args.batch * max(ns) * args.heads * args.head_dim * dtype.itemsize
    have = memory_bytes(device)
    if need > have:
        raise ValueError(f"--n {max(ns)}: {what} alone need {need / 2**30:.1f} GiB "
                         f"(--batch {args.batch} --heads {args.heads} --head-dim {args.head_dim} "
                         f"--dtype {args.dtype}), more than the {have / 2**30:.1f} GiB of {device}")
    try:
        get_backend(args.backend, torch.empty(1, 1, args.heads, args.head_dim, dtype=dtype, device=device))
    except ValueError as e:
        raise ValueError(f"--backend {args.backend}: {e}") from None
    pattern = DilatedPattern.paper() if pattern is None else pattern
    return (pattern if args.pattern == COMPARE else PATTERN_VARIANTS[args.pattern](pattern)), device, ns


def extrapolate_dense(rows: List[Row], ns: List[int], *, heads: int, head_dim: int, batch: int,
                      causal: bool) -> List[Row]:
    """Rows (impl EXTRAPOLATED, forward only) at ``ns`` from the quadratic fit of the measured
    dense forward times in ``rows`` (common.quadratic_fit): estimates, never measurements."""
    dense = [r for r in rows if r.impl == "dense-sdpa"]
    a, b = common.quadratic_fit([r.n for r in dense], [r.fwd_ms for r in dense])
    out = []
    for n in ns:
        ms = a * n + b * n * n
        flops = dense_flops(n, heads, head_dim, causal=causal, batch=batch)
        out.append(Row(EXTRAPOLATED, n, ms, NAN, flops / ms / 1e6, NAN, NAN, NAN, NAN))
    return out


def plot_figure5(rows: List[Row], path: str, title: str) -> None:
    """Forward time against N (log-log), dilated against dense: the paper's Figure 5.
    Dense is solid where measured and dashed, labelled "extrapolated", where fitted."""
    p = Panel("forward time (dense dashed: quadratic fit of its measured times)", "sequence length N",
              "forward time (s)", xscale=("log", {"base": 2}), yscale=("log", {}))
    dilated = [r for r in rows if r.impl.startswith("dilated")]
    p.series.append(Series(dilated[0].impl, [r.n for r in dilated], [r.fwd_ms / 1e3 for r in dilated], "o-", "C0"))
    p.series += report.extrapolated_series(
        "dense SDPA", [(r.n, r.fwd_ms / 1e3) for r in rows if r.impl == "dense-sdpa"],
        [(r.n, r.fwd_ms / 1e3) for r in rows if r.impl == EXTRAPOLATED], "s-", "C1")
    report.plot_panels([p], path, title, size=(7, 4.8))


def _measure_all(args, pattern: DilatedPattern, device: torch.device, ns: List[int]) -> List[Row]:
    """Rows of every N (and, with --figure5, the extrapolated dense rows after them)."""
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    causal, max_n = not args.non_causal, _dense_max_n(args)
    shape = dict(heads=args.heads, head_dim=args.head_dim, batch=args.batch)
    rows: List[Row] = []
    for n in ns:
        dense = not args.no_dense and (max_n is None or n <= max_n)
        rows += measure(n, **shape, pattern=pattern, dtype=DTYPES[args.dtype], device=device, causal=causal,
                        backend=args.backend, repeats=repeats, warmup=warmup, dense=dense,
                        memory=not args.no_memory, fwdbwd=not args.figure5,
                        dense_op=dense and not args.no_dense_op and not args.figure5,
                        variant=PATTERN_VARIANTS["lw16"](pattern) if args.pattern == COMPARE else None)
        print(f"  N={n}: done", flush=True)
    if args.figure5:
        rows += extrapolate_dense(rows, [n for n in ns if n > max_n], **shape, causal=causal)
    return rows


def run(args: argparse.Namespace) -> int:
    """Check every argument, then measure each N, print the table and write --csv/--plot."""
    try:
        pattern, device, ns = _checked(args)
    except ValueError as e:
        print(f"longnet bench: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    title = (f"{machine_name(device)} | {args.dtype} {'non-causal' if args.non_causal else 'causal'} | "
             f"B={args.batch} H={args.heads} D={args.head_dim} | {pattern}")
    print(title, flush=True)
    if args.breakdown:
        from . import breakdown
        return breakdown.run(args, pattern, device, ns)
    rows = _measure_all(args, pattern, device, ns)
    print(format_table(rows))
    if args.figure5:
        print(f"{EXTRAPOLATED}: dense forward time from the fit t = a N + b N^2 of the measured dense rows, "
              "not measured")
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        (plot_figure5 if args.figure5 else plot)(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def parse_cli(argv: List[str]) -> Tuple[Callable[[argparse.Namespace], int], argparse.Namespace]:
    """(run function, parsed arguments) for ``longnet bench ARGV``; nothing is measured.

    With ``--sequence-parallel`` the rest of argv belongs to the weak-scaling benchmark, with
    ``--lm`` to the LM training-throughput benchmark (:mod:`.lm`).
    """
    if "--sequence-parallel" in argv:
        from . import sp
        return sp.run, sp.build_parser("longnet bench --sequence-parallel").parse_args([a for a in argv if a != "--sequence-parallel"])
    if "--lm" in argv:
        from . import lm
        return lm.run, lm.build_parser("longnet bench --lm").parse_args([a for a in argv if a != "--lm"])
    if "--varlen" in argv:
        from . import varlen
        return varlen.run, varlen.build_parser().parse_args([a for a in argv if a != "--varlen"])
    if "--encoder" in argv:
        from . import encoder
        return encoder.run, encoder.build_parser().parse_args([a for a in argv if a != "--encoder"])
    p = argparse.ArgumentParser(prog="longnet bench", description=__doc__.splitlines()[0],
                                epilog="longnet bench --sequence-parallel --help: the weak-scaling benchmark; "
                                       "longnet bench --lm --help: LM training throughput; "
                                       "longnet bench --varlen --help: packed variable-length batches; "
                                       "longnet bench --encoder --help: LongNetEncoder time and memory")
    add_arguments(p)
    return run, p.parse_args(argv)


def cli_main(argv: List[str]) -> int:
    """``longnet bench [...]``; with ``--sequence-parallel`` or ``--lm`` the rest goes to that benchmark."""
    fn, args = parse_cli(argv)
    return fn(args)


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
