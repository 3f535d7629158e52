"""``longnet bench --encoder``: time and exact peak memory of :class:`longnet.LongNetEncoder` (not a test).

    longnet bench --encoder [--preset gigapath] [--tokens 10000,50000] [--dtypes fp32,bf16]
        [--csv FILE] [--plot FILE]

One sequence (batch 1) of ``tokens`` random d_in embeddings, random weights, forward under
``no_grad`` after a 64-token warm-up call. Every point runs in a fresh process, so its peak
resident memory (``getrusage`` ``ru_maxrss``: exact, not sampled) is its own; reported with
the resident memory after building the model, so the forward's own share can be read off.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import report
from ..argtypes import output_file, positive_int_list
from ..report import Column, Panel, Series
from .common import DTYPES

__all__ = ["Row", "run_point", "build_parser", "run", "main"]


@dataclass
class Row:
    preset: str
    dtype: str
    tokens: int
    build_s: float
    fwd_s: float
    model_rss_mib: float
    peak_rss_mib: float


COLUMNS = (
    Column("preset", "preset", width=9, align="<"), Column("dtype", "dtype", width=6, align="<"),
    Column("tokens", "tokens", width=8), Column("build s", "build_s", ".2f", 8), Column("fwd s", "fwd_s", ".2f", 8),
    Column("model MiB", "model_rss_mib", ".0f", 10), Column("peak MiB", "peak_rss_mib", ".0f", 9),
)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_point(preset: str, dtype: str, tokens: int) -> Row:
    """Measure one point in this process (call it in a fresh one: the peak is the process's)."""
    from ..encoder import LongNetEncoder, encoder_preset
    t0 = time.perf_counter()
    cfg = encoder_preset(preset)
    enc = LongNetEncoder(cfg).eval().to(DTYPES[dtype])
    build = time.perf_counter() - t0
    model_rss = _rss_mib()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc(torch.randn(1, 64, cfg.d_in, generator=g).to(DTYPES[dtype]))
        x = torch.randn(1, tokens, cfg.d_in, generator=g).to(DTYPES[dtype])
        t0 = time.perf_counter()
        out = enc(x)
        fwd = time.perf_counter() - t0
    assert torch.isfinite(out.pooled.float()).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Row(preset, dtype, tokens, build, fwd, model_rss, peak)


def _fresh_point(preset: str, dtype: str, tokens: int) -> Row:
    code = ("import json, dataclasses; from longnet.bench.encoder import run_point; "
            f"print(json.dumps(dataclasses.asdict(run_point({preset!r}, {dtype!r}, {tokens}))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"encoder point {preset} {dtype} {tokens} failed: {res.stderr.strip()[-2000:]}")
    return Row(**json.loads(res.stdout.strip().splitlines()[-1]))


def plot(rows: List[Row], path: str, title: str) -> None:
    time_p = Panel("forward time", "tokens", "seconds")
    mem_p = Panel("peak resident memory", "tokens", "MiB")
    for dt in dict.fromkeys(r.dtype for r in rows):
        rs = [r for r in rows if r.dtype == dt]
        time_p.series.append(Series(dt, [r.tokens for r in rs], [r.fwd_s for r in rs], "o-"))
        mem_p.series.append(Series(dt, [r.tokens for r in rs], [r.peak_rss_mib for r in rs], "s-"))
    report.plot_panels([time_p, mem_p], path, title)


def build_parser(prog: str = "longnet bench --encoder") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gigapath", help="an encoder preset (longnet.encoder.ENCODER_PRESETS)")
    p.add_argument("--tokens", type=positive_int_list, default=[10000, 50000])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16, fp64")
    p.add_argument("--csv", type=output_file, default=None)
    p.add_argument("--plot", type=output_file, default=None)
    return p


def run(args: argparse.Namespace) -> int:
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes must be a comma-separated subset of {sorted(DTYPES)}, got {args.dtypes!r}")
    rows = [_fresh_point(args.preset, dt, n) for dt in dtypes for n in args.tokens]
    title = f"LongNetEncoder preset {args.preset}, batch 1, forward under no_grad, fresh process per point"
    report.publish(rows, COLUMNS, title, args.csv, args.plot, plot)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
