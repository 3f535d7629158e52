"""Weak scaling of sequence-parallel dilated attention (the paper's Figure 5 setting).

Each of P ranks holds a fixed block of L positions (N = P*L grows with P) and
runs forward and backward of ``dilated_attention(..., group=...)``. Reported
per rank: forward and backward time (median over repeats; mean and max over
ranks) and the bytes it sent and received per call. Ideal weak scaling keeps
both flat as P grows. Also timed, for reference: one process computing the
whole N on its own.

Two ways to run:

* On one machine (default): ``python -m longnet.bench.sp`` spawns
  P = 1, 2, 4 gloo processes in turn (``--world-sizes``) and prints a table,
  writes a CSV and a PNG.
* Under torchrun (any backend, several nodes): one measurement at
  P = WORLD_SIZE per launch; rank 0 appends its row to the CSV and redraws
  the plot from every row in it::

      torchrun --nproc_per_node 8 -m longnet.bench.sp --device cuda --dtype bf16 \\
          --block-length 32768 --csv sp.csv --plot sp.png
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import report
from ..argtypes import (
    nonneg_int,
    output_file,
    pattern_from_flags,
    positive_int,
    positive_int_list,
)
from ..device import machine_name
from ..patterns import DilatedPattern
from ..report import Column, Panel, Series
from . import common
from .common import DTYPES


@dataclass
class Row:
    world_size: int
    block_length: int
    seq_len: int
    fwd_ms_mean: float
    fwd_ms_max: float
    bwd_ms_mean: float
    bwd_ms_max: float
    fwd_sent_bytes: int
    fwd_recv_bytes: int
    bwd_sent_bytes: int
    bwd_recv_bytes: int
    single_fwd_ms: float
    single_bwd_ms: float
    device: str
    config: str


def _pair(a: float, b: float, fmt: str) -> str:
    return "" if a != a else f"{a:{fmt}}/{b:{fmt}}"  # NaN (not measured) -> blank


COLUMNS = (
    Column("P", "world_size", width=3), Column("N", "seq_len", width=8),
    Column("fwd ms mean/max", lambda r: _pair(r.fwd_ms_mean, r.fwd_ms_max, ".1f"), width=17),
    Column("bwd ms mean/max", lambda r: _pair(r.bwd_ms_mean, r.bwd_ms_max, ".1f"), width=17),
    Column("fwd sent/recv KiB", lambda r: _pair(r.fwd_sent_bytes / 1024, r.fwd_recv_bytes / 1024, ".0f"),
           width=19),
    Column("bwd sent/recv KiB", lambda r: _pair(r.bwd_sent_bytes / 1024, r.bwd_recv_bytes / 1024, ".0f"),
           width=19),
    Column("1-proc N fwd/bwd ms", lambda r: _pair(r.single_fwd_ms, r.single_bwd_ms, ".1f"), width=21),
)


def _pattern(args) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(w, r) of --segment-lengths/--dilation-rates, else L/4, L/2, L, 2L with r = 1, 2, 4, 8."""
    p = pattern_from_flags(args.segment_lengths, args.dilation_rates)
    if p is None:
        # w/r = L/4 for every pattern; the largest (2L) spans two ranks once P >= 2.
        L = args.block_length
        if L % 32:
            raise ValueError(f"--block-length must be a multiple of 32 for the default pattern, got {L}")
        p = DilatedPattern((L // 4, L // 2, L, 2 * L), (1, 2, 4, 8))
    return p.segment_lengths, p.dilation_rates


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group)


def _measure(args, group, device) -> dict:
    """This rank's median forward/backward ms and bytes per call."""
    from .. import dilated_attention
    from ..backends.collectives import comm_stats
    w, r = _pattern(args)
    dtype = DTYPES[args.dtype]
    rank = dist.get_rank(group) if group is not None else 0
    g = torch.Generator().manual_seed(1234 + rank)
    shape = (args.batch, args.block_length, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    do = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    fwd, bwd, stats = [], [], None
    for it in range(args.warmup + args.repeats):
        for x in (q, k, v):
            x.grad = None
        with comm_stats() as s:
            _barrier(group)  # ranks start together, so no rank's time includes waiting for another
            with common.timed(device) as t_fwd:
                out = dilated_attention(q, k, v, w, r, is_causal=not args.non_causal, group=group)
            _barrier(group)
            with common.timed(device) as t_bwd:
                out.backward(do)
        if it >= args.warmup:
            fwd.append(t_fwd.ms)
            bwd.append(t_bwd.ms)
            stats = s
    ph = stats.by_phase
    return {"fwd": statistics.median(fwd), "bwd": statistics.median(bwd),
            "fwd_sent": ph.get("forward", [0, 0])[0], "fwd_recv": ph.get("forward", [0, 0])[1],
            "bwd_sent": ph.get("backward", [0, 0])[0], "bwd_recv": ph.get("backward", [0, 0])[1]}


def _config(args) -> str:
    w, r = _pattern(args)
    return (f"{args.dtype} {'non-causal' if args.non_causal else 'causal'} B={args.batch} H={args.heads} "
            f"D={args.head_dim} w={','.join(map(str, w))} r={','.join(map(str, r))}")


def _row(args, results: List[dict], world: int, device: str, single=(float("nan"), float("nan"))) -> Row:
    return Row(world, args.block_length, world * args.block_length,
               statistics.mean(x["fwd"] for x in results), max(x["fwd"] for x in results),
               statistics.mean(x["bwd"] for x in results), max(x["bwd"] for x in results),
               max(x["fwd_sent"] for x in results), max(x["fwd_recv"] for x in results),
               max(x["bwd_sent"] for x in results), max(x["bwd_recv"] for x in results),
               single[0], single[1], device, _config(args))


# ---------------------------------------------------------------- spawn mode (one machine, gloo)

def _spawn_worker(rank, world, args, tmpdir):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        res = _measure(args, dist.group.WORLD if world > 1 else None, torch.device("cpu"))
        torch.save(res, f"{tmpdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(args, n: int):
    """Forward/backward ms of one process computing the whole sequence of n positions."""
    a = argparse.Namespace(**vars(args))
    a.block_length = n
    if not (args.segment_lengths or args.dilation_rates):
        # Keep the pattern of the distributed run (defined from the per-rank block length).
        w, r = _pattern(args)
        a.segment_lengths, a.dilation_rates = ",".join(map(str, w)), ",".join(map(str, r))
    res = _measure(a, None, torch.device("cpu"))
    return res["fwd"], res["bwd"]


def _run_spawned(args) -> List[Row]:
    import torch.multiprocessing as mp
    rows = []
    torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    if max(args.world_sizes) * args.threads > cores:
        print(f"note: up to {max(args.world_sizes)} ranks x {args.threads} threads on {cores} cores: "
              "ranks share cores there, so per-rank time also measures that sharing", flush=True)
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmpdir:
            mp.spawn(_spawn_worker, args=(world, args, tmpdir), nprocs=world, join=True)
            results = [torch.load(f"{tmpdir}/rank{r}.pt") for r in range(world)]
        single = _single_process(args, world * args.block_length) if args.single_baseline else \
            (float("nan"), float("nan"))
        rows.append(_row(args, results, world, f"cpu, {cores} cores (gloo, spawned)", single))
        print(format_table(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


# ---------------------------------------------------------------- torchrun mode

def _run_torchrun(args) -> List[Row]:
    device = torch.device(args.device or "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        world = dist.get_world_size()
        res = _measure(args, dist.group.WORLD if world > 1 else None, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
    finally:
        dist.destroy_process_group()
    name = machine_name(device) if device.type == "cuda" else "cpu"
    return [_row(args, gathered, world, f"{name} ({'nccl' if device.type == 'cuda' else 'gloo'})")]


# ---------------------------------------------------------------- output

def format_table(rows: List[Row], header: bool = True) -> str:
    return report.format_table(rows, COLUMNS, header=header)


def write_csv(rows: List[Row], path: str, append: bool = False) -> List[Row]:
    """Write rows (after the rows already in ``path`` when ``append``); returns all rows written."""
    if append and os.path.exists(path):
        rows = report.read_csv(path, Row) + rows
    report.write_csv(rows, path)
    return rows


def plot(rows: List[Row], path: str) -> None:
    """Per-rank time and traffic against P (log2 axis), one set of lines per (device, config, L)."""
    ticks = sorted({r.world_size for r in rows})
    log2 = ("log", {"base": 2})
    time_p = Panel("weak scaling: time per rank", "ranks P (N = P*L)", "ms per rank (max over ranks)",
                   xscale=log2, xticks=ticks)
    comm_p = Panel("traffic per rank", "ranks P (N = P*L)", "MiB per rank per step", xscale=log2, xticks=ticks)
    for (dev, cfg, L) in dict.fromkeys((r.device, r.config, r.block_length) for r in rows):
        rs = sorted((r for r in rows if (r.device, r.config, r.block_length) == (dev, cfg, L)),
                    key=lambda r: r.world_size)
        ps, lab = [r.world_size for r in rs], f"{dev}, L={L}"
        time_p.series += [Series(f"forward ({lab})", ps, [r.fwd_ms_max for r in rs], "o-"),
                          Series(f"backward ({lab})", ps, [r.bwd_ms_max for r in rs], "s--")]
        if any(r.single_fwd_ms == r.single_fwd_ms for r in rs):
            time_p.series.append(Series(f"1 process, whole N, fwd+bwd ({lab})", ps,
                                        [r.single_fwd_ms + r.single_bwd_ms for r in rs], "x:"))
        comm_p.series += [
            Series(f"sent fwd+bwd ({lab})", ps, [(r.fwd_sent_bytes + r.bwd_sent_bytes) / 2**20 for r in rs], "o-"),
            Series(f"received fwd+bwd ({lab})", ps,
                   [(r.fwd_recv_bytes + r.bwd_recv_bytes) / 2**20 for r in rs], "s--")]
    report.plot_panels([time_p, comm_p], path, rows[-1].config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-length", type=positive_int, default=4096, help="positions per rank L (fixed)")
    p.add_argument("--world-sizes", type=positive_int_list, default=[1, 2, 4],
                   help="comma-separated P to spawn on this machine (ignored under torchrun)")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--segment-lengths", default=None,
                   help="comma-separated w_i (default L/4, L/2, L, 2L with r = 1, 2, 4, 8)")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (torchrun mode; spawn mode is CPU only)")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per rank; the median is reported")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per process")
    p.add_argument("--no-single-baseline", dest="single_baseline", action="store_false",
                   help="skip timing one process on the whole N")
    p.add_argument("--csv", type=output_file, default="sp_weak_scaling.csv", help="CSV path ('' to skip)")
    p.add_argument("--plot", type=output_file, default="sp_weak_scaling.png", help="PNG path ('' to skip)")


def build_parser(prog: str = "python -m longnet.bench.sp") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(prog=prog)  # run() names the command in its errors as the user typed it
    return p


def _validate(args, torchrun: bool) -> None:
    """Every check that can fail, before any process is spawned or any group is formed."""
    from ..backends.sequence_parallel import check_sequence_parallel
    from ..device import pick_device  # the one rule for --device
    w, r = _pattern(args)
    if torchrun:
        pick_device(args.device or "cpu")
    elif args.device not in (None, "cpu"):
        raise ValueError(f"--device {args.device}: spawn mode runs gloo processes on the CPU; "
                         "launch with torchrun for other devices")
    worlds: Sequence[int] = [int(os.environ["WORLD_SIZE"])] if torchrun else args.world_sizes
    for world in (p for p in worlds if p > 1):  # one process runs the plain op: any pattern fits
        try:
            check_sequence_parallel(args.block_length, world, w, r)
        except ValueError as e:
            raise ValueError(f"--block-length {args.block_length} at P = {world}: {e}") from None
    if torchrun and args.csv and os.path.exists(args.csv):
        try:  # under torchrun the row is appended: refuse another kind of CSV before measuring
            report.read_csv(args.csv, Row)
        except ValueError as e:
            raise ValueError(f"--csv {args.csv}: rows are appended to it under torchrun, but {e}") from None


def run(args: argparse.Namespace) -> int:
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        _validate(args, torchrun)
    except ValueError as e:
        print(f"{getattr(args, 'prog', 'longnet.bench.sp')}: error: {e}", file=sys.stderr)
        return 2
    print(_config(args), flush=True)
    rows = _run_torchrun(args) if torchrun else _run_spawned(args)
    if torchrun and int(os.environ["RANK"]) != 0:
        return 0
    if torchrun:
        print(format_table(rows))
    all_rows = rows
    if args.csv:
        all_rows = write_csv(rows, args.csv, append=torchrun)
        print(f"wrote {args.csv}")
    if args.plot:
        plot(all_rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
