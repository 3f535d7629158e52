"""``longnet bench --breakdown``: where the dilated op's time goes, and what its kernel allows.

Two tables (not tests; nothing here asserts a time):

1. For each N and for forward / forward+backward: one dilated call's time, the part
   spent inside the dense attention kernel calls (each timed as it runs), the ratio
   dense/dilated, and the *kernel-bound* ratio dense/kernel-time, which is what the op
   would reach if everything outside its kernel calls (gathers, merges, gradient
   accumulation) cost nothing.
2. For each kept length S = w_i / r_i of the pattern: PyTorch's kernel on N tokens cut
   into (N / S) x H independent causal problems of S rows, against the same problems
   without the causal mask, and the kernel the op uses for them (``kernels.attn_fwd``:
   longnet's own where :mod:`longnet.backends.cpu_flash` takes the call). A kernel that
   skipped every masked score would take (S + 1) / (2 S) of the unmasked time; one that
   skips only whole key tiles of T columns takes about 1/2 + T / (2 S) of it, so short
   causal segments pay relatively more.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

from .. import report
from ..backends import kernels
from ..patterns import DilatedPattern, clip_segment, dense_flops, dilated_flops
from ..report import Column
from . import common

NAN = float("nan")


@dataclass
class Split:
    n: int
    mode: str
    dilated_ms: float
    kernel_ms: float
    kernel_share: float
    dense_ms: float
    dense_over_dilated: float
    dense_over_kernel: float  # the kernel-bound ratio
    flop_ratio: float


@dataclass
class Tiles:
    kept: int
    problems: int
    causal_ms: float
    full_ms: float
    causal_over_full: float
    ideal: float  # (S + 1) / (2 S): a kernel that computes only unmasked scores
    causal_gflops: float  # counting only the unmasked scores' FLOPs
    op_kernel_ms: float  # the same causal problems through kernels.attn_fwd
    op_kernel_over_causal: float


SPLIT_COLUMNS = (
    Column("N", "n", width=8), Column("mode", "mode", width=7, align="<"),
    Column("dilated ms", "dilated_ms", ".1f", 11), Column("in kernel ms", "kernel_ms", ".1f", 13),
    Column("kernel %", "kernel_share", ".1%", 9), Column("dense ms", "dense_ms", ".1f", 10),
    Column("dense/dil", "dense_over_dilated", ".2f", 10), Column("dense/kernel", "dense_over_kernel", ".2f", 13),
    Column("FLOP ratio", "flop_ratio", ".2f", 11),
)
TILE_COLUMNS = (
    Column("kept S", "kept", width=7), Column("problems", "problems", width=9),
    Column("causal ms", "causal_ms", ".1f", 10), Column("unmasked ms", "full_ms", ".1f", 12),
    Column("causal/unmasked", "causal_over_full", ".3f", 16), Column("ideal", "ideal", ".3f", 7),
    Column("causal GF/s", "causal_gflops", ".1f", 12),
    Column("op's kernel ms", "op_kernel_ms", ".1f", 15), Column("op's/causal", "op_kernel_over_causal", ".3f", 12),
)


@dataclass
class KernelClock:
    seconds: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def kernel_clock(device: torch.device) -> Iterator[KernelClock]:
    """Time every dense kernel call (``kernels._attn_fwd`` / ``_attn_bwd``) made in the body.

    The clock's totals grow as calls finish. On CUDA each call is synchronised before
    and after, which the real op does not do: read it as an estimate there.
    """
    clock = KernelClock()
    originals = kernels._attn_fwd, kernels._attn_bwd

    def clocked(fn):
        def call(*args):
            common.sync(device)
            start = time.perf_counter()
            out = fn(*args)
            common.sync(device)
            clock.seconds += time.perf_counter() - start
            clock.calls += 1
            return out
        return call

    kernels._attn_fwd, kernels._attn_bwd = (clocked(f) for f in originals)
    try:
        yield clock
    finally:
        kernels._attn_fwd, kernels._attn_bwd = originals


def measure_split(n: int, *, heads: int, head_dim: int, batch: int, pattern: DilatedPattern, dtype,
                  device: torch.device, causal: bool, backend: Optional[str], repeats: int,
                  warmup: int) -> List[Split]:
    """One :class:`Split` per mode at length n: dilated and dense calls take turns, best of ``repeats``."""
    shape = (batch, n, heads, head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    rows = []
    for mode in ("fwd", "fwdbwd"):
        dil, dense = (common.attention_call(impl, mode, q, k, v, do, pattern, causal)
                      for impl in (backend, common.DENSE))
        for _ in range(warmup):
            dil(), dense()
        best = (float("inf"), NAN)
        dense_best = float("inf")
        for _ in range(repeats):
            with kernel_clock(device) as in_kernel, common.timed(device) as t:
                dil()
            best = min(best, (t.seconds, in_kernel.seconds))
            with common.timed(device) as t:
                dense()
            dense_best = min(dense_best, t.seconds)
        bwd = mode == "fwdbwd"
        fl = dense_flops(n, heads, head_dim, causal=causal, batch=batch, backward=bwd) / dilated_flops(
            n, heads, head_dim, pattern.segment_lengths, pattern.dilation_rates, causal=causal, batch=batch,
            backward=bwd)
        total, kernel = best
        rows.append(Split(n, mode, total * 1e3, kernel * 1e3, kernel / total, dense_best * 1e3,
                          dense_best / total, dense_best / kernel, fl))
    return rows


def kept_lengths(pattern: DilatedPattern, n: int) -> List[int]:
    """The distinct kept lengths ceil(w'_i / r_i) of the pattern at length n (w' = min(w, n))."""
    return sorted({-(-clip_segment(w, n) // r) for w, r in pattern})


def measure_tiles(kept: int, n: int, *, heads: int, head_dim: int, batch: int, dtype, device: torch.device,
                  repeats: int, warmup: int) -> Tiles:
    """PyTorch's kernel alone on (B * ceil(n / kept) * H) independent problems of ``kept`` rows, causal
    and not, and the op's kernel (``kernels.attn_fwd``) on the causal ones; interleaved, best of ``repeats``."""
    z = batch * heads * -(-n // kept)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, z, kept, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))

    def call(causal):
        def run():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def op_kernel():
        with torch.no_grad():
            return kernels.attn_fwd(q, k, v, True, head_dim ** -0.5)

    t_c, t_f, t_op = (min(ts) for ts in common.interleaved_times([call(True), call(False), op_kernel], device,
                                                                  repeats, warmup))
    unmasked_flops = 4.0 * z * head_dim * kept * (kept + 1) / 2
    return Tiles(kept, z, t_c * 1e3, t_f * 1e3, t_c / t_f, (kept + 1) / (2 * kept), unmasked_flops / t_c / 1e9,
                 t_op * 1e3, t_op / t_c)


def run(args, pattern: DilatedPattern, device: torch.device, ns: List[int]) -> int:
    """Print (and with --csv write) both tables; --csv FILE gets FILE and FILE's stem + '_tiles.csv'."""
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype, causal = common.DTYPES[args.dtype], not args.non_causal
    shape = dict(heads=args.heads, head_dim=args.head_dim, batch=args.batch)
    splits: List[Split] = []
    for n in ns:
        splits += measure_split(n, **shape, pattern=pattern, dtype=dtype, device=device, causal=causal,
                                backend=args.backend, repeats=repeats, warmup=warmup)
        print(f"  N={n}: done", flush=True)
    print(report.format_table(splits, SPLIT_COLUMNS))
    print("dense/kernel: dense time over the time inside the dilated op's kernel calls, the ratio if "
          "nothing else cost anything")
    n = max(ns)
    tiles = [measure_tiles(s, n, **shape, dtype=dtype, device=device, repeats=repeats, warmup=warmup)
             for s in kept_lengths(pattern, n)]
    print(f"\nPyTorch's kernel alone at N={n}: causal problems of S rows against the same without the mask, "
          "and the kernel the op uses for them")
    print(report.format_table(tiles, TILE_COLUMNS))
    print("ideal: (S + 1) / (2 S), a kernel that computes only the unmasked scores")
    if args.csv:
        report.write_csv(splits, args.csv)
        tiles_csv = args.csv[:-4] + "_tiles.csv" if args.csv.endswith(".csv") else args.csv + "_tiles.csv"
        report.write_csv(tiles, tiles_csv)
        print(f"wrote {args.csv} and {tiles_csv}")
    return 0
