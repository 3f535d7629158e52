"""``longnet bench``: time and memory of dilated vs dense attention (not a test).

For each N it measures forward and forward+backward of ``dilated_attention``
and of dense causal ``F.scaled_dot_product_attention`` on the same machine in
the same run, peak memory growth, and achieved GFLOP/s by SPEC.md §3's count.
Prints a table; ``--csv`` and ``--plot`` write the results.

Peak memory: on CUDA from the allocator's statistics; on CPU as growth of the
resident set sampled in a thread, which the allocator's reuse of freed pages
blurs for small tensors, so read it at large N (e.g. ``--n 65536 --no-dense``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..fileio import atomic_path, atomic_savefig
from ..functional import dilated_attention
from ..patterns import DilatedPattern, dense_flops, dilated_flops

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    dense_over_dilated_fwd: float = float("nan")
    dense_over_dilated_fwdbwd: float = float("nan")


class _PeakRSS:
    """Peak resident memory above a baseline, sampled in a thread (CPU has no allocator stats)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    # Best of R: interference from other processes only ever adds time.
    return min(times)


def _peak_growth(fn: Callable[[], None], device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakRSS() as m:
        fn()
    return m.growth


def measure(n: int, *, heads: int, head_dim: int, batch: int, pattern: DilatedPattern, dtype,
            device, causal: bool, backend: Optional[str], repeats: int, warmup: int,
            dense: bool, memory: bool) -> List[Row]:
    shape = (batch, n, heads, head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    do = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    io_bytes = 8 * q.numel() * q.element_size()  # q, k, v, out and their gradients
    rows = []

    def dilated_fwd():
        with torch.no_grad():
            dilated_attention(q, k, v, pattern.segment_lengths, pattern.dilation_rates,
                              is_causal=causal, backend=backend)

    def dilated_fwdbwd():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = dilated_attention(qq, kk, vv, pattern.segment_lengths, pattern.dilation_rates,
                                is_causal=causal, backend=backend)
        out.backward(do)

    def dense_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal)

    def dense_fwdbwd():
        qq, kk, vv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).backward(do.transpose(1, 2))

    impls = [(f"dilated[{backend or 'auto'}]", dilated_fwd, dilated_fwdbwd,
              dilated_flops(n, heads, head_dim, pattern.segment_lengths, pattern.dilation_rates,
                            causal=causal, batch=batch))]
    if dense:
        impls.append(("dense-sdpa", dense_fwd, dense_fwdbwd,
                      dense_flops(n, heads, head_dim, causal=causal, batch=batch)))
    for name, fwd, fwdbwd, flops in impls:
        t_f = _time(fwd, device, repeats, warmup)
        t_fb = _time(fwdbwd, device, repeats, warmup)
        mem = _peak_growth(fwdbwd, device) if memory else 0
        rows.append(Row(name, n, t_f * 1e3, t_fb * 1e3, flops / t_f / 1e9, 3.5 * flops / t_fb / 1e9,
                        mem / 2**20, io_bytes / 2**20, mem / io_bytes))
    if dense:
        rows[0].dense_over_dilated_fwd = rows[1].fwd_ms / rows[0].fwd_ms
        rows[0].dense_over_dilated_fwdbwd = rows[1].fwdbwd_ms / rows[0].fwdbwd_ms
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def format_table(rows: List[Row]) -> str:
    head = (f"{'impl':<18}{'N':>8}{'fwd ms':>11}{'fwd+bwd ms':>12}{'fwd GF/s':>10}{'f+b GF/s':>10}"
            f"{'mem MiB':>10}{'mem/io':>8}{'dense/dil fwd':>15}{'dense/dil f+b':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = lambda x: "" if x != x else f"{x:.2f}"  # noqa: E731  (NaN -> blank)
        lines.append(f"{r.impl:<18}{r.n:>8}{r.fwd_ms:>11.1f}{r.fwdbwd_ms:>12.1f}{r.fwd_gflops:>10.1f}"
                     f"{r.fwdbwd_gflops:>10.1f}{r.peak_mem_mib:>10.0f}{r.mem_over_io:>8.2f}"
                     f"{ratio(r.dense_over_dilated_fwd):>15}{ratio(r.dense_over_dilated_fwdbwd):>15}")
    return "\n".join(lines)


def write_csv(rows: List[Row], path: str) -> None:
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows: List[Row], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r.impl for r in rows):
        rs = [r for r in rows if r.impl == impl]
        ns = [r.n for r in rs]
        axes[0].loglog(ns, [r.fwd_ms for r in rs], "o-", label=f"{impl} fwd")
        axes[0].loglog(ns, [r.fwdbwd_ms for r in rs], "s--", label=f"{impl} fwd+bwd")
        axes[1].semilogx(ns, [r.fwd_gflops for r in rs], "o-", label=f"{impl} fwd")
        axes[1].semilogx(ns, [r.fwdbwd_gflops for r in rs], "s--", label=f"{impl} fwd+bwd")
    axes[0].set(xlabel="sequence length N", ylabel="time (ms)", title="time")
    axes[1].set(xlabel="sequence length N", ylabel="GFLOP/s (SPEC §3 count)", title="throughput")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", default=None,
                   help="comma-separated sequence lengths (default 4096,8192,16384; --quick: 2048,4096)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segment-lengths", default=None, help="comma-separated w_i (default: the paper's)")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i (default: the paper's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--non-causal", action="store_true", help="benchmark non-causal attention")
    p.add_argument("--backend", default=None, help="dilated_attention backend (default: auto)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baseline")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run of seconds")
    p.add_argument("--csv", default=None, help="write results to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG plot to this file")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="run the weak-scaling benchmark of sequence parallelism instead (its own options: "
                        "longnet bench --sequence-parallel --help)")


def _parse_ns(text: str) -> List[int]:
    try:
        ns = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--n must be comma-separated integers, got {text!r}") from None
    if not ns or min(ns) < 1:
        raise SystemExit(f"--n must list positive integers, got {text!r}")
    return ns


def run(args: argparse.Namespace, argv_rest: Optional[List[str]] = None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.segment_lengths or args.dilation_rates:
        if not (args.segment_lengths and args.dilation_rates):
            raise SystemExit("give both --segment-lengths and --dilation-rates, or neither")
        try:
            pattern = DilatedPattern.parse(args.segment_lengths, args.dilation_rates)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"bad pattern: {e}") from None
    else:
        pattern = DilatedPattern.paper()
    ns = _parse_ns(args.n) if args.n else ([2048, 4096] if args.quick else [4096, 8192, 16384])
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype = DTYPES[args.dtype]
    causal = not args.non_causal
    title = (f"{machine_name(device)} | {args.dtype} {'causal' if causal else 'non-causal'} | "
             f"B={args.batch} H={args.heads} D={args.head_dim} | {pattern}")
    print(title, flush=True)
    rows: List[Row] = []
    for n in ns:
        rows += measure(n, heads=args.heads, head_dim=args.head_dim, batch=args.batch, pattern=pattern,
                        dtype=dtype, device=device, causal=causal, backend=args.backend,
                        repeats=repeats, warmup=warmup, dense=not args.no_dense,
                        memory=not args.no_memory)
        print(f"  N={n}: done", flush=True)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def cli_main(argv: List[str]) -> int:
    """``longnet bench [...]``; with ``--sequence-parallel`` the rest goes to the SP benchmark."""
    if "--sequence-parallel" in argv:
        from . import sp as sp_bench
        return sp_bench.main([a for a in argv if a != "--sequence-parallel"])
    p = argparse.ArgumentParser(prog="longnet bench", description=__doc__.splitlines()[0],
                                epilog="longnet bench --sequence-parallel --help: the weak-scaling benchmark")
    add_arguments(p)
    return run(p.parse_args(argv))


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
