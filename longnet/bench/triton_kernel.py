"""GPU benchmark of the fused Triton backend (issue 5): one command, one CSV.

    python -m longnet.bench.triton_kernel --csv triton_bench.csv

For the paper pattern (w = 2048..32768, r = 1, 2, 4, 6, 12), B = 1, bf16 and
H x D in ``--dims`` (default 12x64 and 16x128, i.e. H*D = 768 and 2048), it
times forward and forward+backward of

- ``dilated_attention(..., backend="triton")``,
- ``dilated_attention(..., backend="torch")`` (strided views + flash kernels),
- dense ``F.scaled_dot_product_attention`` (flash), up to ``--dense-max-n``,

and reports achieved TFLOP/s by docs/design.md §3's count
(:func:`longnet.patterns.dilated_flops` / ``dense_flops``), triton's fraction
of dense SDPA's TFLOP/s (issue target >= 0.70), its speed-up over the torch
backend (target > 1 at every N >= 16K), and with ``--max-n`` the largest N
whose forward+backward fits (B=1, H=12, D=64; target >= 1M tokens).
``--sweep`` times a few tile configurations (set the winner with
``LONGNET_TRITON_CONFIG``). CSV columns: see :data:`FIELDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import report
from ..argtypes import output_file, positive_int
from ..device import machine_name
from ..functional import dilated_attention  # for _fits
from ..patterns import DilatedPattern, dense_flops, dilated_flops
from ..report import Column
from . import common

FIELDS = ("gpu", "backend", "heads", "head_dim", "n", "causal", "mode", "ms", "tflops",
          "frac_of_dense", "speedup_vs_torch", "note")

COLUMNS = (
    Column("backend", "backend", width=7), Column("H", "heads", width=3), Column("D", "head_dim", width=4),
    Column("N", "n", width=8), Column("causal", lambda r: int(r["causal"]), width=6),
    Column("mode", "mode", width=6, align="<"), Column("ms", "ms", ".3f", 10),
    Column("TF/s", "tflops", ".1f", 7), Column("frac_dense", lambda r: r.get("frac_of_dense", ""), width=10),
    Column("vs_torch", lambda r: r.get("speedup_vs_torch", ""), width=8),
    Column("note", "note", width=4, align="<"),
)

# Tile configs the sweep times, per head dim (D <= 64 share one list), each compiled without
# spills and within the shared memory of the GPUs it is listed for (tests/test_triton_compile.py):
# "all" on sm_80 and sm_90a, "sm90" on sm_90a only.
SWEEP_CONFIGS = {
    64: {"all": ("128,64,8,3;128,32,8,3;128,32,8,3",
                 "64,64,4,3;64,32,4,3;64,32,4,3",
                 "64,32,8,2;64,32,8,2;32,32,4,2",
                 "64,64,8,2;64,32,8,1;64,32,8,1"),
         "sm90": ()},
    128: {"all": ("128,32,8,2;64,32,8,2;128,32,8,2",
                  "128,32,8,2;64,32,8,2;128,32,8,3",
                  "64,32,8,2;64,32,8,2;128,32,8,2",
                  "64,32,8,2;64,32,8,2;32,32,4,2"),
          "sm90": ("128,64,8,2;64,32,8,2;128,32,8,3",)},
}


def sweep_configs(head_dim: int, capability) -> tuple:
    """The sweep's LONGNET_TRITON_CONFIG values for ``head_dim`` on a GPU of ``capability``."""
    lists = SWEEP_CONFIGS[64 if head_dim <= 64 else 128]
    return lists["all"] + (lists["sm90"] if tuple(capability) >= (9, 0) else ())


def _size(text: str) -> int:
    """A positive length, with an optional k (1024) or M (1024**2) suffix: 16k, 1M, 3000."""
    t = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        v = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length like 16384, 16k or 1M, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive length, got {text!r}")
    return v


def _sizes(text: str) -> List[int]:
    return [_size(x) for x in text.split(",")]


def _dims(text: str) -> List[Tuple[int, int]]:
    """"12x64,16x128" -> [(12, 64), (16, 128)]: heads x head dim, both positive."""
    out = []
    for item in text.split(","):
        try:
            h, d = (int(t) for t in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected HxD pairs like 12x64,16x128, got {text!r}") from None
        if h < 1 or d < 1:
            raise argparse.ArgumentTypeError(f"heads and head dim must be positive, got {item!r}")
        out.append((h, d))
    return out


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=output_file, default="triton_bench.csv", help="output CSV path (written atomically)")
    p.add_argument("--dims", type=_dims, default=_dims("12x64,16x128"), help="HxD list, e.g. 12x64,16x128")
    p.add_argument("--seq-lens", type=_sizes, default=_sizes("16k,32k,64k,128k,256k,512k,1M"),
                   help="sequence lengths, e.g. 16k,32k,1M")
    p.add_argument("--backends", default="triton,torch,sdpa", help="subset of triton,torch,sdpa")
    p.add_argument("--modes", default="fwd,fwdbwd", help="subset of fwd,fwdbwd")
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--dense-max-n", type=_size, default=_size("32k"),
                   help="largest N for dense SDPA (its cost is quadratic)")
    p.add_argument("--torch-max-n", type=_size, default=_size("1M"), help="largest N for the torch backend")
    p.add_argument("--max-n", action="store_true",
                   help="also search the largest N for triton fwd+bwd (B=1, H=12, D=64)")
    p.add_argument("--max-n-cap", type=_size, default=_size("16M"))
    p.add_argument("--sweep", action="store_true", help="time tile configs at N=--sweep-n and print them")
    p.add_argument("--sweep-n", type=_size, default=_size("128k"))
    p.add_argument("--warmup", type=positive_int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=positive_int, default=100, help="do_bench repetition time, ms")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m longnet.bench.triton_kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    for b in args.backends:
        if b not in ("triton", "torch", "sdpa"):
            p.error(f"--backends: unknown backend {b!r}, expected triton, torch or sdpa")
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            p.error(f"--modes: unknown mode {m!r}, expected fwd or fwdbwd")
    if not args.backends or not args.modes:
        p.error("--backends and --modes must each name at least one value")
    return args


def measure(backend: str, mode: str, n: int, heads: int, head_dim: int, causal: bool, dtype,
            pattern: DilatedPattern, warmup: int, rep: int) -> Dict:
    """One timing: {'ms', 'tflops'} or {'note': 'oom'}; B = 1."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, n, heads, head_dim)
    try:
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
        fn = common.attention_call(backend, mode, q, k, v, do, pattern, causal)
        ms = common.gpu_median_ms(fn, warmup, rep)
    except torch.cuda.OutOfMemoryError:
        return {"ms": float("nan"), "tflops": float("nan"), "note": "oom"}
    finally:
        torch.cuda.empty_cache()
    bwd = mode == "fwdbwd"
    if backend == "sdpa":
        flops = dense_flops(n, heads, head_dim, causal=causal, backward=bwd)
    else:
        flops = dilated_flops(n, heads, head_dim, pattern.segment_lengths, pattern.dilation_rates,
                              causal=causal, backward=bwd)
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "note": ""}


def _fits(n: int, dtype, pattern: DilatedPattern) -> bool:
    try:
        q, k, v, do = (torch.randn(1, n, 12, 64, device="cuda", dtype=dtype) for _ in range(4))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        dilated_attention(*leaves, pattern.segment_lengths, pattern.dilation_rates, is_causal=True,
                          backend="triton").backward(do)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        q = k = v = do = leaves = None  # noqa: F841  (free before empty_cache)
        torch.cuda.empty_cache()


def largest_n(dtype, pattern: DilatedPattern, cap: int, start: int = 1 << 18, step: int = 1 << 16) -> int:
    """Largest N (multiple of ``step``) whose causal fwd+bwd fits: doubling, then bisection."""
    lo, hi = 0, None
    n = start
    while n <= cap:
        if _fits(n, dtype, pattern):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:
        return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if _fits(mid, dtype, pattern) else (lo, mid)
    return lo


def write_csv(rows: List[Dict], path: str) -> None:
    report.write_csv(rows, path, FIELDS)


def sweep(args, dtype, pattern: DilatedPattern) -> None:
    """Time each tile config of SWEEP_CONFIGS for triton fwd and fwd+bwd."""
    from ..backends import triton_backend as tb
    old = os.environ.get("LONGNET_TRITON_CONFIG")
    try:
        for heads, head_dim in args.dims:
            print(f"\nsweep H={heads} D={head_dim} N={args.sweep_n} (LONGNET_TRITON_CONFIG values)")
            cap = torch.cuda.get_device_capability()
            for cfg in (None,) + sweep_configs(head_dim, cap):
                if cfg is None:
                    os.environ.pop("LONGNET_TRITON_CONFIG", None)
                    label = f"default {tb.default_config(head_dim, cap)}"
                else:
                    os.environ["LONGNET_TRITON_CONFIG"] = cfg
                    label = cfg
                res = []
                for mode in ("fwd", "fwdbwd"):
                    try:
                        m = measure("triton", mode, args.sweep_n, heads, head_dim, True, dtype, pattern,
                                    args.warmup, args.rep)
                        res.append(f"{mode} {m['ms']:.2f} ms {m['tflops']:.0f} TF/s {m['note']}")
                    except Exception as e:  # a config may not fit in shared memory
                        res.append(f"{mode} failed: {type(e).__name__}: {str(e)[:80]}")
                print(f"  {label}: " + " | ".join(res), flush=True)
    finally:
        if old is None:
            os.environ.pop("LONGNET_TRITON_CONFIG", None)
        else:
            os.environ["LONGNET_TRITON_CONFIG"] = old


def _rows_at(args, n: int, heads: int, head_dim: int, causal: bool, mode: str, dtype,
             pattern: DilatedPattern, gpu: str, dense_best: float) -> Tuple[List[Dict], float]:
    """Rows of every backend at one (N, H, D, causal, mode), and dense SDPA's best TFLOP/s so far."""
    res = {}
    for backend in args.backends:
        if (backend == "sdpa" and n > args.dense_max_n) or (backend == "torch" and n > args.torch_max_n):
            continue
        res[backend] = measure(backend, mode, n, heads, head_dim, causal, dtype, pattern, args.warmup, args.rep)
    if "sdpa" in res and res["sdpa"]["tflops"] == res["sdpa"]["tflops"]:
        # Dense TFLOP/s is flat in N once N >> tile size: compare with its best so far.
        dense_best = res["sdpa"]["tflops"] if dense_best != dense_best else max(res["sdpa"]["tflops"], dense_best)
    rows = []
    for backend, m in res.items():
        row = dict(gpu=gpu, backend=backend, heads=heads, head_dim=head_dim, n=n, causal=causal, mode=mode,
                   ms=round(m["ms"], 4), tflops=round(m["tflops"], 2), note=m["note"])
        if backend != "sdpa" and dense_best == dense_best:
            row["frac_of_dense"] = round(m["tflops"] / dense_best, 3)
        if backend == "triton" and "torch" in res:
            row["speedup_vs_torch"] = round(res["torch"]["ms"] / m["ms"], 3)
        rows.append(row)
    return rows, dense_best


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("triton_bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    from ..backends import triton_backend as tb
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    pattern = DilatedPattern.paper()
    gpu = machine_name(torch.device("cuda"))
    print(f"{gpu}, torch {torch.__version__}, triton {tb.TRITON_VERSION}, {args.dtype}, paper pattern, B=1")
    if args.sweep:
        sweep(args, dtype, pattern)
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    rows: List[Dict] = []
    print(report.format_table([], COLUMNS), flush=True)
    for heads, head_dim in args.dims:
        for causal in causals:
            for mode in args.modes:
                dense_best = float("nan")
                for n in args.seq_lens:
                    new, dense_best = _rows_at(args, n, heads, head_dim, causal, mode, dtype, pattern,
                                               gpu, dense_best)
                    rows += new
                    print(report.format_table(new, COLUMNS, header=False), flush=True)
                write_csv(rows, args.csv)
    if args.max_n:
        n_max = largest_n(dtype, pattern, args.max_n_cap)
        print(f"largest N for triton causal fwd+bwd (B=1, H=12, D=64): {n_max}")
        rows.append(dict(gpu=gpu, backend="triton", heads=12, head_dim=64, n=n_max, causal=True,
                         mode="max_n_fwdbwd", note=f"largest fitting N (cap {args.max_n_cap})"))
    write_csv(rows, args.csv)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
