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
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import List, Optional

import torch
import torch.distributed as dist

from ..fileio import atomic_path, atomic_savefig

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _pattern(args):
    from ..patterns import DilatedPattern
    if args.segment_lengths or args.dilation_rates:
        if not (args.segment_lengths and args.dilation_rates):
            raise SystemExit("give both --segment-lengths and --dilation-rates, or neither")
        p = DilatedPattern.parse(args.segment_lengths, args.dilation_rates)
    else:
        # w/r = L/4 for every pattern; the largest (2L) spans two ranks once P >= 2.
        L = args.block_length
        if L % 32:
            raise SystemExit(f"--block-length must be a multiple of 32 for the default pattern, got {L}")
        p = DilatedPattern((L // 4, L // 2, L, 2 * L), (1, 2, 4, 8))
    return p.segment_lengths, p.dilation_rates


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            if group is not None:
                dist.barrier(group)
            _sync(device)
            t0 = time.perf_counter()
            out = dilated_attention(q, k, v, w, r, is_causal=not args.non_causal, group=group)
            _sync(device)
            t1 = time.perf_counter()
            if group is not None:
                dist.barrier(group)
            _sync(device)
            t2 = time.perf_counter()
            out.backward(do)
            _sync(device)
            t3 = time.perf_counter()
        if it >= args.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t3 - t2) * 1e3)
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
        rows.append(_row(args, results, world, f"cpu, {os.cpu_count()} cores (gloo, spawned)", single))
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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [_row(args, gathered, world, f"{name} ({'nccl' if device.type == 'cuda' else 'gloo'})")]


# ---------------------------------------------------------------- output

def format_table(rows: List[Row], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(f"{'P':>3} {'N':>8} {'fwd ms mean/max':>17} {'bwd ms mean/max':>17} "
                     f"{'fwd sent/recv KiB':>19} {'bwd sent/recv KiB':>19} {'1-proc N fwd/bwd ms':>21}")
    for r in rows:
        lines.append(f"{r.world_size:>3} {r.seq_len:>8} {r.fwd_ms_mean:>8.1f}/{r.fwd_ms_max:<8.1f} "
                     f"{r.bwd_ms_mean:>8.1f}/{r.bwd_ms_max:<8.1f} "
                     f"{r.fwd_sent_bytes / 1024:>9.0f}/{r.fwd_recv_bytes / 1024:<9.0f} "
                     f"{r.bwd_sent_bytes / 1024:>9.0f}/{r.bwd_recv_bytes / 1024:<9.0f} "
                     f"{r.single_fwd_ms:>10.1f}/{r.single_bwd_ms:<10.1f}")
    return "\n".join(lines)


def write_csv(rows: List[Row], path: str, append: bool = False) -> List[Row]:
    """Write rows (after the rows already in ``path`` when ``append``); returns all rows written."""
    if append and os.path.exists(path):
        with open(path, newline="") as f:
            types = {fl.name: fl.type for fl in fields(Row)}
            conv = {"int": int, "float": float, "str": str}
            old = [Row(**{k: conv[types[k]](v) for k, v in rec.items()}) for rec in csv.DictReader(f)]
        rows = old + rows
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return rows


def plot(rows: List[Row], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (dev, cfg, L) in dict.fromkeys((r.device, r.config, r.block_length) for r in rows):
        rs = sorted((r for r in rows if (r.device, r.config, r.block_length) == (dev, cfg, L)),
                    key=lambda r: r.world_size)
        ps = [r.world_size for r in rs]
        lab = f"{dev}, L={L}"
        axes[0].plot(ps, [r.fwd_ms_max for r in rs], "o-", label=f"forward ({lab})")
        axes[0].plot(ps, [r.bwd_ms_max for r in rs], "s--", label=f"backward ({lab})")
        if any(r.single_fwd_ms == r.single_fwd_ms for r in rs):
            axes[0].plot(ps, [r.single_fwd_ms + r.single_bwd_ms for r in rs], "x:",
                         label=f"1 process, whole N, fwd+bwd ({lab})")
        axes[1].plot(ps, [(r.fwd_sent_bytes + r.bwd_sent_bytes) / 2**20 for r in rs], "o-",
                     label=f"sent fwd+bwd ({lab})")
        axes[1].plot(ps, [(r.fwd_recv_bytes + r.bwd_recv_bytes) / 2**20 for r in rs], "s--",
                     label=f"received fwd+bwd ({lab})")
    axes[0].set(xlabel="ranks P (N = P*L)", ylabel="ms per rank (max over ranks)",
                title="weak scaling: time per rank")
    axes[1].set(xlabel="ranks P (N = P*L)", ylabel="MiB per rank per step", title="traffic per rank")
    ticks = sorted({r.world_size for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(rows[-1].config, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-length", type=int, default=4096, help="positions per rank L (fixed)")
    p.add_argument("--world-sizes", default="1,2,4",
                   help="comma-separated P to spawn on this machine (ignored under torchrun)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segment-lengths", default=None,
                   help="comma-separated w_i (default L/4, L/2, L, 2L with r = 1, 2, 4, 8)")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (torchrun mode; spawn mode is CPU only)")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--no-single-baseline", dest="single_baseline", action="store_false",
                   help="skip timing one process on the whole N")
    p.add_argument("--csv", default="sp_weak_scaling.csv", help="CSV path ('' to skip)")
    p.add_argument("--plot", default="sp_weak_scaling.png", help="PNG path ('' to skip)")


def run(args: argparse.Namespace) -> int:
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    for k, v in vars(defaults.parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)  # tolerate a caller's namespace that lacks some of our options
    if isinstance(args.world_sizes, str):
        try:
            args.world_sizes = [int(t) for t in args.world_sizes.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if not args.world_sizes or min(args.world_sizes) < 1:
        raise SystemExit(f"--world-sizes must list positive integers, got {args.world_sizes}")
    _pattern(args)  # validate early
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
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
    p = argparse.ArgumentParser(prog="python -m longnet.bench.sp", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
